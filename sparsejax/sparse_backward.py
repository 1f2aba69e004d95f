"""Weight gradients only at the active entries of a mask (the sparse backward pass).

For a layer ``y = x @ W`` with ``W [in, out]`` and tokens ``t``, the dense backward
pass forms ``dW = x^T dy`` (a matmul as large as the forward one) and a sparse run
then keeps ``k`` of its entries. Here the trained variables are the ``k`` active
values themselves, and the backward pass computes only

    dx = dy @ W^T                                   (dense, as autodiff does)
    dvalues[j] = sum_t x[t, a_j] * dy[t, b_j]       (a sampled dense-dense product)

for the active entries ``(a_j, b_j)`` of ``W``, in float32 (products and sums), and
never the ``[in, out]`` gradient. The same holds for

* an embedding lookup ``h = E[tokens]``: ``dvalues[j] = sum_{t: tokens[t] = r_j}
  dh[t, c_j]`` at the active entries ``(r_j, c_j)`` of ``E``, a segment sum over the
  distinct tokens of the batch (``[tokens, hidden]``, never ``[vocab, hidden]``);
* a tied output matrix ``logits = h @ E^T``: the sampled product with transposed
  coordinates (entry ``(r, c)`` of ``E`` is entry ``(c, r)`` of ``E^T``); both
  contributions add up in the cotangent of the one ``values`` leaf.

* the stacked kernels ``W [E, in, out]`` of a mixture-of-experts layer, applied by a
  grouped matmul to expert-sorted rows (:func:`sparsejax.models.moe.grouped_matmul`):
  ``dvalues[j] = sum_{t in group e_j} x[t, a_j] * dy[t, b_j]`` at the active entries
  ``(e_j, a_j, b_j)``, expert by expert (:class:`SparseExperts`; never ``[E, in, out]``).

A tensor without active entries is a constant (no weight-gradient work at all). A
masked tensor that is not a matrix or a stack of expert kernels (norm weights, biases)
gets the dense gradient of its few entries, gathered at the mask: ``scatter(W, idx,
values)`` is differentiated.

Mechanism: :func:`attach` turns ``(params, mask, values)`` into the params the model
sees, with each masked matrix replaced by a :class:`SparseWeight` pytree holding the
current tensor (it already contains the values), its mask leaf and the differentiable
values. The model's matmuls and lookups go through :func:`sparsejax.models.ops.matmul`
and :func:`~sparsejax.models.ops.take_rows`, which are the plain ``jnp`` ops for an
array (so the dense path is unchanged) and call a :class:`SparseWeight`'s ``rmatmul`` /
``take_rows``, the custom-VJP versions here. :func:`value_and_grad`
puts it together: ``jax.value_and_grad`` with respect to the values tree. Both mask
layouts (flat ``(k,)`` and row-balanced ``(rows, c)``) hold flat indices, so entry
``(a, b)`` is ``divmod(idx, cols)``. The sampled product runs on the backend switch of
:mod:`sparsejax.backends` (``xla``; ``pallas``/``interpret``: the Triton kernel in
:mod:`sparsejax.kernels.sampled_matmul`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import backends
from sparsejax.models import moe
from sparsejax.models.ops import dense_matmul, flat_tokens, gather_rows, is_low_precision, low_precision_dx
from sparsejax.optim.sparse import gather_bits, scatter
from sparsejax.parallel import sharding
from sparsejax.types import PyTree

__all__ = ["SparseExperts", "SparseWeight", "attach", "value_and_grad", "compressed_values", "use_sparse_grads",
           "AUTO_MAX_DENSITY"]

AUTO_MAX_DENSITY = {"cpu": 0.1, "cpu_xla": 0.01, "gpu": 0.01}
"""Largest mask density (active / all entries) at which ``sparse_grads="auto"`` uses
the sparse backward, per platform; measured by ``experiments/bench_train_step.py`` (2
layers of Qwen2.5-0.5B, 4 x 512 tokens, float32, side by side with the dense gradient +
gather). ``"cpu"``, with the C++ sampled-product kernel: 1.52x at 1%, 1.48x at 3%, 1.27x
at 10%, 0.88x at 30%. ``"cpu_xla"``, XLA's gather where the kernel cannot be built:
1.27x at 1%, the largest density measured. ``"gpu"``: not yet measured; 1% is the
working figure until the benchmark runs on one (there the dense weight-gradient matmul
runs on tensor cores)."""


def use_sparse_grads(setting: str, density: float, backend: str = "auto") -> bool:
    """Whether a sparse run uses the sparse backward: ``"on"``, ``"off"``, or ``"auto"``
    (on iff ``density <= AUTO_MAX_DENSITY`` of the platform the backend runs on, and on
    a CPU of whether the C++ kernel is there)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"sparse_grads must be auto, on or off, got {setting!r}")
    if setting != "auto":
        return setting == "on"
    on_gpu = backends.resolve_backend(backend) == "pallas" or jax.default_backend() == "gpu"
    if on_gpu:
        return density <= AUTO_MAX_DENSITY["gpu"]
    from sparsejax.kernels import cpu_sampled_product
    return density <= AUTO_MAX_DENSITY["cpu" if cpu_sampled_product.available() else "cpu_xla"]


@jax.tree_util.register_pytree_node_class
class SparseWeight:
    """A masked matrix seen by the model: its tensor, mask leaf and trainable values.

    ``weight`` is the stored tensor (``[rows, cols]``, already holding ``values`` at
    ``indices``; no gradient flows into it), ``indices`` its mask leaf and ``values``
    the differentiable active values (shaped like ``indices``). ``transposed`` views
    the matrix as ``weight.T`` (a tied output matrix). With a ``mesh``, the sampled
    product runs per device on its tokens (:func:`sparsejax.parallel.sharding.per_shard_product`).
    ``w[...]`` is ``w`` itself, as for an ``nnx.Param``'s value; any other use as an
    array raises.
    """

    def __init__(self, weight, indices, values, transposed: bool = False, backend="auto",
                 mesh=None):
        self.weight, self.indices, self.values = weight, indices, values
        self.transposed, self.backend, self.mesh = transposed, backend, mesh

    def tree_flatten(self):
        return ((self.weight, self.indices, self.values),
                (self.transposed, self.backend, self.mesh))

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        s = tuple(self.weight.shape)
        return s[::-1] if self.transposed else s

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def T(self) -> SparseWeight:
        return SparseWeight(self.weight, self.indices, self.values, not self.transposed,
                            self.backend, self.mesh)

    def __getitem__(self, key):
        if key is Ellipsis:
            return self
        raise TypeError("a SparseWeight supports only w[...]; use sparsejax.models.ops.take_rows "
                        "for an embedding lookup (or sparse_grads off)")

    def __jax_array__(self):
        raise TypeError("a SparseWeight reached an op other than sparsejax.models.ops.matmul "
                        "/ take_rows; this model needs sparse_grads off")

    def rmatmul(self, x: jax.Array, *, preferred_element_type=None) -> jax.Array:
        """``x @ self`` (:func:`sparsejax.models.ops.matmul`); its backward gives the
        weight gradient only at the active entries."""
        return _sparse_matmul(x, self.weight, self.indices, self.values, self.transposed,
                              preferred_element_type, self.backend, self.mesh)

    def take_rows(self, tokens: jax.Array) -> jax.Array:
        """``self[tokens]`` (:func:`sparsejax.models.ops.take_rows`); its backward gives
        the active entries of the rows the batch uses."""
        if self.transposed:
            raise ValueError("take_rows: a transposed SparseWeight has no rows to look up")
        return _sparse_take_rows(self.weight, self.indices, self.values, tokens)


def _coords(w: SparseWeight) -> tuple[jax.Array, jax.Array]:
    """``(a, b)``: flat ``(k,)`` in/out coordinates of the active entries in ``w.shape``."""
    idx = w.indices.reshape(-1)
    r, c = jnp.divmod(idx, jnp.int32(w.weight.shape[1]))
    return (c, r) if w.transposed else (r, c)


# ----------------------------------------------------------------------------- matmul

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _sparse_matmul(x, weight, indices, values, transposed, preferred_element_type, backend,
                   mesh):
    return dense_matmul(x, weight, transposed, preferred_element_type)


def _sparse_matmul_fwd(x, weight, indices, values, transposed, preferred_element_type,
                       backend, mesh):
    y = _sparse_matmul(x, weight, indices, values, transposed, preferred_element_type,
                       backend, mesh)
    return y, (x, weight, indices, values)


def _sparse_matmul_bwd(transposed, preferred_element_type, backend, mesh, res, dy):
    x, weight, indices, values = res
    if is_low_precision(x, weight):
        dx = low_precision_dx(dy, weight, transposed).astype(x.dtype)
    else:
        # dx exactly as autodiff of the plain matmul computes it (same ops, same rounding).
        _, vjp_x = jax.vjp(
            lambda x_: dense_matmul(x_, weight, transposed, preferred_element_type), x)
        (dx,) = vjp_x(dy)
    a, b = _coords(SparseWeight(weight, indices, values, transposed))
    product = backends.sampled_product_fn(backend)
    if mesh is not None:
        product = sharding.per_shard_product(product, mesh)
    dv = product(flat_tokens(x), flat_tokens(dy), a, b)
    return dx, None, None, dv.reshape(values.shape).astype(values.dtype)


_sparse_matmul.defvjp(_sparse_matmul_fwd, _sparse_matmul_bwd)


# ----------------------------------------------------------------------------- lookup


@jax.custom_vjp
def _sparse_take_rows(weight, indices, values, tokens):
    return gather_rows(weight, tokens)


def _sparse_take_rows_fwd(weight, indices, values, tokens):
    return gather_rows(weight, tokens), (weight.shape[0], weight.shape[1], indices, values, tokens)


def _sparse_take_rows_bwd(res, dh):
    vocab, cols, indices, values, tokens = res
    tok = tokens.reshape(-1).astype(jnp.int32)
    n = tok.shape[0]
    # Distinct tokens of the batch (padded with `vocab`, past every row), and each
    # token's slot: the gradient of the rows the batch uses is [n, cols], never [vocab, cols].
    uniq, inv = jnp.unique(tok, size=n, fill_value=vocab, return_inverse=True)
    g = jax.ops.segment_sum(dh.reshape(n, cols).astype(jnp.float32), inv.reshape(-1),
                            num_segments=n)
    r, c = jnp.divmod(indices.reshape(-1), jnp.int32(cols))
    slot = jnp.clip(jnp.searchsorted(uniq, r), 0, n - 1)
    dv = jnp.where(uniq[slot] == r, g[slot, c], 0.0)
    return None, None, dv.reshape(values.shape).astype(values.dtype), None


_sparse_take_rows.defvjp(_sparse_take_rows_fwd, _sparse_take_rows_bwd)


# ----------------------------------------------------------------------------- experts


@jax.tree_util.register_pytree_node_class
class SparseExperts:
    """A masked stack of expert kernels ``[E, in, out]`` seen by the model: its tensor
    (already holding ``values``; no gradient flows into it), mask leaf and trainable
    values. :func:`sparsejax.models.moe.grouped_matmul` calls :meth:`grouped_rmatmul`,
    whose backward gives the gradient only at the active entries, expert by expert.
    ``w[...]`` is ``w`` itself; any other use as an array raises."""

    def __init__(self, weight, indices, values):
        self.weight, self.indices, self.values = weight, indices, values

    def tree_flatten(self):
        return (self.weight, self.indices, self.values), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def dtype(self):
        return self.weight.dtype

    def __getitem__(self, key):
        if key is Ellipsis:
            return self
        raise TypeError("a SparseExperts supports only w[...] (sparse_grads off for other uses)")

    def __jax_array__(self):
        raise TypeError("a SparseExperts reached an op other than "
                        "sparsejax.models.moe.grouped_matmul; this model needs sparse_grads off")

    def grouped_rmatmul(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """``y[r] = x[r] @ w[g(r)]`` for expert-sorted rows (``group_sizes [E]``)."""
        return _sparse_grouped(x, self.weight, self.indices, self.values, group_sizes)


@jax.custom_vjp
def _sparse_grouped(x, weight, indices, values, group_sizes):
    return moe.grouped_matmul(x, weight, group_sizes)


def _sparse_grouped_fwd(x, weight, indices, values, group_sizes):
    y = _sparse_grouped(x, weight, indices, values, group_sizes)
    return y, (x, weight, indices, values, group_sizes)


def _sparse_grouped_bwd(res, dy):
    x, weight, indices, values, group_sizes = res
    dx = moe.grouped_matmul_dx(dy.astype(x.dtype), weight, group_sizes).astype(x.dtype)
    dv = grouped_sampled_product(x, dy, group_sizes, indices.reshape(-1), weight.shape)
    return dx, None, None, dv.reshape(values.shape).astype(values.dtype), None


_sparse_grouped.defvjp(_sparse_grouped_fwd, _sparse_grouped_bwd)

ROW_TILE = 256        # rows of one step of grouped_sampled_product
ENTRY_CHUNK = 8192    # active entries of one step


def grouped_sampled_product(x: jax.Array, dy: jax.Array, group_sizes: jax.Array,
                            indices: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """``dv[j] = sum_{r in group e_j} x[r, a_j] * dy[r, b_j]`` (float32) for the sorted flat
    indices ``indices [k]`` of entries ``(e_j, a_j, b_j)`` of a ``shape = (E, in, out)``
    stack, rows of ``x [M, in]`` and ``dy [M, out]`` in consecutive groups of
    ``group_sizes [E]`` rows.

    Expert by expert, over blocks of ``ROW_TILE`` of its rows and ``ENTRY_CHUNK`` of its
    entries (dynamic trip counts): about ``sum_e rows_e x entries_e`` products, the work
    of the routed rows on the active entries only, with ``[ROW_TILE, ENTRY_CHUNK]``
    temporaries. Both mask layouts qualify (their flat indices are sorted, so each
    expert's entries are contiguous).
    """
    num_experts, ins, outs = (int(d) for d in shape)
    rows, k = x.shape[0], indices.shape[0]
    if k == 0:
        return jnp.zeros((0,), jnp.float32)
    if rows == 0:
        return jnp.zeros((k,), jnp.float32)
    tile, chunk = min(ROW_TILE, rows), min(ENTRY_CHUNK, k)
    per = jnp.int32(ins * outs)
    ends = jnp.cumsum(group_sizes).astype(jnp.int32)
    starts = ends - group_sizes.astype(jnp.int32)
    indices = indices.astype(jnp.int32)
    bounds = jnp.searchsorted(indices, jnp.arange(num_experts + 1, dtype=jnp.int32) * per
                              ).astype(jnp.int32)  # expert e's entries: [bounds[e], bounds[e+1])

    # Blocks are windows moved back to end at the last row / entry (nothing is padded:
    # a padded copy of x would be one more buffer per layer); each block uses only the
    # rows / entries from its own start on.
    def expert(e, dv):
        r_hi, k_lo, k_hi = ends[e], bounds[e], bounds[e + 1]

        def row_block(state):
            r0, dv = state
            rs = jnp.minimum(r0, rows - tile)
            row = rs + jnp.arange(tile)
            xt = jnp.where(((row >= r0) & (row < r_hi))[:, None], moe.take_slice(x, rs, tile), 0)
            dyt = moe.take_slice(dy, rs, tile)

            def entry_block(state):
                k0, dv = state
                ks = jnp.minimum(k0, k - chunk)
                pos = ks + jnp.arange(chunk)
                valid = (pos >= k0) & (pos < k_hi)
                a, b = jnp.divmod(moe.take_slice(indices, ks, chunk) - e * per, jnp.int32(outs))
                a, b = jnp.where(valid, a, 0), jnp.where(valid, b, 0)
                part = jnp.einsum("rk,rk->k", xt[:, a], dyt[:, b],
                                  preferred_element_type=jnp.float32)
                old = jax.lax.dynamic_slice_in_dim(dv, ks, chunk)
                return k0 + chunk, jax.lax.dynamic_update_slice_in_dim(
                    dv, old + jnp.where(valid, part, 0.0), ks, 0)

            _, dv = jax.lax.while_loop(lambda s: s[0] < k_hi, entry_block, (k_lo, dv))
            return r0 + tile, dv

        _, dv = jax.lax.while_loop(lambda s: (s[0] < r_hi) & (k_lo < k_hi), row_block,
                                   (starts[e], dv))
        return dv

    return jax.lax.fori_loop(0, num_experts, expert, jnp.zeros((k,), jnp.float32))


# ----------------------------------------------------------------------------- trees


def compressed_values(params: PyTree, mask: PyTree) -> PyTree:
    """float32 values of ``params`` at ``mask`` (shaped like the mask leaves)."""
    return jax.tree.map(lambda p, i: gather_bits(p, i).astype(jnp.float32), params, mask)


def _attach_leaf(p, idx, v, backend, mesh):
    p = jax.lax.stop_gradient(p)
    if idx.size == 0:
        return p  # a constant: no weight-gradient work at all
    if p.ndim == 2:
        return SparseWeight(p, idx, v, False, backend, mesh)
    if p.ndim == 3:  # a stack of expert kernels (the decoder's only 3-D params)
        return SparseExperts(p, idx, v)
    # Small tensors (norm weights, biases): the dense gradient of the leaf, gathered.
    return scatter(p, idx, v.astype(p.dtype))


def attach(params: PyTree, mask: PyTree, values: PyTree, backend: str = "auto",
           mesh=None) -> PyTree:
    """The params the model sees: masked matrices as :class:`SparseWeight` (see module doc).

    ``params`` must already hold ``values`` at the mask (the forward pass reads the
    tensors); gradients with respect to ``values`` are the compressed gradient. With a
    ``mesh`` (batches split over its ``("data", "fsdp")`` axes), the sampled products
    run per device.
    """
    return jax.tree.map(lambda p, i, v: _attach_leaf(p, i, v, backend, mesh), params, mask,
                        values)


def value_and_grad(loss_fn: Callable[[PyTree], Any], params: PyTree, mask: PyTree, *,
                   has_aux: bool = False, backend: str = "auto", mesh=None):
    """``jax.value_and_grad(loss_fn)`` with the gradient only at the mask's entries.

    Returns ``(value, grads)`` where ``grads`` holds float32 gradients shaped like the
    mask leaves, equal to ``gather(jax.grad(loss_fn)(params), mask)`` up to float32
    rounding, computed without any dense ``[in, out]`` weight gradient.
    """
    values = compressed_values(params, mask)
    f = lambda v: loss_fn(attach(params, mask, v, backend, mesh))
    return jax.value_and_grad(f, has_aux=has_aux)(values)
