"""Sparse AdamW with compressed state: moments only for the ``k`` active entries.

Two ways to step, over the same :class:`SparseAdamWState`:

1. :func:`sparse_adamw` is an ``optax.GradientTransformationExtraArgs``. Its updates
   are dense and zero off the mask, so it chains with any optax transform and with
   ``optax.apply_updates``; at the active entries it is exactly ``optax.adamw``.
2. :func:`fused_sparse_adamw` writes the new values of the ``k`` active entries
   straight into the (donated) params: no dense update tensor, nothing of size ``N``
   touched but those entries. Optionally it keeps a float32 master copy of the
   active values, so that small updates to bf16 params are not lost to rounding.

Both agree with the reference ``mask * optax.adamw(mask * g)`` to float32 rounding.
The per-tensor work goes through :mod:`sparsejax.backends` (``xla``, ``pallas``,
``interpret``). For masks in the row-balanced ``(rows, c)`` layout the ``xla``
backend gathers and scatters row by row, which keeps the step shard-local when
params are sharded along their leading axis (FSDP).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax import backends
from sparsejax import masks as masks_lib
from sparsejax.masks.indexing import as_bits as _as_bits
from sparsejax.masks.indexing import gather, gather_bits, scatter, scatter_bits
from sparsejax.optim import adamw_math
from sparsejax.optim.adamw_math import AdamWScalars
from sparsejax.types import PyTree

ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class SparseAdamWState(NamedTuple):
    """State of the sparse AdamW; every per-tensor leaf is shaped like its mask leaf.

    The mask's indices live in the state, so a jitted step reads them as an argument
    (never as a compile-time constant: an 8B model's 1% mask is 320 MB), they shard
    with the moments, and a checkpoint of the state carries its mask.

    Attributes:
      count: int32 ``[]``, steps taken (skipped steps not counted).
      indices: the mask: int32 active indices, ``[k]`` or ``[rows, c]`` per tensor.
      mu: first moments at the active entries, ``[k]`` or ``[rows, c]`` per tensor.
      nu: float32 second moments, same shapes.
      master: float32 copies of the active values (fused step with
        ``master_weights=True``), or None.
      skipped: int32 ``[]``, steps skipped because a gradient was not finite.
    """

    count: jax.Array
    indices: PyTree
    mu: PyTree
    nu: PyTree
    master: PyTree | None
    skipped: jax.Array


class StepInfo(NamedTuple):
    """What the fused step reports.

    Attributes:
      skipped: bool ``[]``, True if a non-finite active gradient skipped the step.
      grad_norm: float32 ``[]``, global norm of the active gradient before clipping;
        None without clipping (no norm is computed, so a row-sharded step needs no
        communication at all).
    """

    skipped: jax.Array
    grad_norm: jax.Array | None = None


# ----------------------------------------------------------------------------- per tensor
# (reading and writing at a mask leaf: sparsejax.masks.indexing)

# Past-the-end indices ``idx + size`` must fit int32 (tensors of up to 2**30 - 1
# entries); a larger tensor's guarded step selects between old and new bits instead.
_MAX_SHIFTED_SIZE = (2**31 - 1) // 2


def _guarded_scatter(param: jax.Array, idx: jax.Array, new_p: jax.Array,
                     ok: jax.Array | None) -> jax.Array:
    """``scatter_bits(param, idx, new_p)`` where ``ok`` (or ``ok`` None); where ``ok`` is
    False, ``param`` with not a bit changed, written in place just the same.

    The indices are shifted past the tensor's end, which XLA's scatter drops (JAX's
    default mode for ``.at[].set``): nothing is written, no whole-tensor select, no
    ``lax.cond`` (whose branches make XLA copy donated buffers). The shifted indices
    stay sorted and unique. Tensors too large to shift in int32 write their own old
    bits back instead (a gather of ``k`` values more; exact as well).
    """
    if ok is None:
        return scatter_bits(param, idx, new_p)
    if param.size <= _MAX_SHIFTED_SIZE:
        return scatter_bits(param, jnp.where(ok, idx, idx + jnp.int32(param.size)), new_p)
    bits = _as_bits(param)
    new_bits = jnp.where(ok, _as_bits(new_p.astype(param.dtype)), gather(bits, idx))
    return jax.lax.bitcast_convert_type(scatter(bits, idx, new_bits), param.dtype)


def _step_tensor(param, grad_active, idx, mu, nu, master, scalars, backend, ok=None):
    """One tensor's fused step on already gathered gradients: returns (param, mu, nu, master).

    With ``ok`` (a bool scalar; xla backend only) the step is guarded: where ``ok`` is
    False the moments and master values keep their old bits (a select on the ``k``
    entries) and the params come back bit for bit (:func:`_guarded_scatter`). No
    whole-tensor select and no ``lax.cond``: donated params are still written in place.
    """
    if idx.size == 0:
        return param, mu, nu, master
    if backend == "xla":
        keep = (lambda new, old: new) if ok is None else (
            lambda new, old: jnp.where(ok, new, old))
        mu32, new_nu = adamw_math.adamw_moments(
            grad_active.astype(jnp.float32), mu.astype(jnp.float32), nu, scalars)
        # The value step reads the kept moments, not the old ones: each old buffer is
        # read once, by the select that overwrites it, so XLA needs no copies of them.
        new_nu = keep(new_nu, nu)
        if mu.dtype == jnp.float32:
            new_mu = mu32 = keep(mu32, mu)
        else:  # the step uses the float32 moment; the state stores its rounding
            new_mu = keep(mu32.astype(mu.dtype), mu)
        p = master if master is not None else gather_bits(param, idx).astype(jnp.float32)
        new_p = p + adamw_math.adamw_delta_from_moments(p, mu32, new_nu, scalars)
        if master is not None:
            new_p = keep(new_p, master)
        return _guarded_scatter(param, idx, new_p, ok), new_mu, new_nu, (
            None if master is None else new_p)
    if ok is not None:
        raise ValueError(f"the guarded step needs backend 'xla', got {backend!r}")
    # Kernels take flat index lists; the row-balanced layout holds flat indices already.
    flat = lambda a: None if a is None else a.reshape(-1)
    param, new_mu, new_nu, new_master = backends.indexed_step_fn(backend)(
        param, flat(grad_active), flat(idx), flat(mu), flat(nu), flat(master), scalars,
        grad_is_compressed=True)
    unflat = lambda a: None if a is None else a.reshape(idx.shape)
    return param, unflat(new_mu), unflat(new_nu), unflat(new_master)


def _step_batched(params, grads, idx, mu, nu, master, scalars, backend, tensors_per_launch):
    """All tensors' fused steps through the multi-tensor kernel (few launches)."""
    from sparsejax.kernels import indexed_adamw
    is_none = lambda x: x is None
    leaves = [jax.tree.leaves(t, is_leaf=is_none) for t in (params, grads, idx, mu, nu, master)]
    treedef = jax.tree.structure(params)
    active = [j for j, i in enumerate(leaves[2]) if i.size]
    flat = lambda a: None if a is None else a.reshape(-1)
    outs = indexed_adamw.indexed_adamw_multi_step(
        [leaves[0][j] for j in active], [flat(leaves[1][j]) for j in active],
        [flat(leaves[2][j]) for j in active], [flat(leaves[3][j]) for j in active],
        [flat(leaves[4][j]) for j in active], [flat(leaves[5][j]) for j in active], scalars,
        grad_is_compressed=True, interpret=backend == "interpret",
        max_tensors_per_launch=tensors_per_launch)
    result = [list(leaves[0]), list(leaves[3]), list(leaves[4]), list(leaves[5])]
    for pos, j in enumerate(active):
        shape = leaves[2][j].shape
        result[0][j] = outs[0][pos]
        for r, out in zip(result[1:], outs[1:]):
            r[j] = None if out[pos] is None else out[pos].reshape(shape)
    return tuple(jax.tree.unflatten(treedef, r) for r in result)


# ----------------------------------------------------------------------------- shared pieces


def _check_mask(mask: PyTree) -> None:
    for leaf in jax.tree.leaves(mask):
        if getattr(leaf, "dtype", None) != jnp.int32 or getattr(leaf, "ndim", 0) not in (1, 2):
            raise ValueError("mask leaves must be int32 index arrays of rank 1 or 2 "
                             "(see sparsejax.masks); got "
                             f"{getattr(leaf, 'dtype', type(leaf))} {getattr(leaf, 'shape', '')}")


def _init_state(mask: PyTree, params: PyTree, mu_dtype: Any, master_weights: bool):
    # Indices outside a tensor, unsorted or duplicated would silently train other
    # entries (a negative index trains the last one): refuse them, naming the tensor.
    masks_lib.validate_mask(mask, params)
    # A copy (keeping any sharding): the fused step donates the state, which must not
    # delete the caller's mask arrays.
    mask = jax.tree.map(lambda i: jnp.array(i, copy=True), mask)
    if jax.tree.structure(mask) != jax.tree.structure(params):
        raise ValueError("mask and params differ in structure:\n"
                         f"{jax.tree.structure(mask)}\nvs\n{jax.tree.structure(params)}")
    mu_dtype = jnp.float32 if mu_dtype is None else jnp.dtype(mu_dtype)
    # zeros_like keeps the mask's sharding: the row-balanced state shards like the weight.
    mu = jax.tree.map(lambda i: jnp.zeros_like(i, dtype=mu_dtype), mask)
    nu = jax.tree.map(lambda i: jnp.zeros_like(i, dtype=jnp.float32), mask)
    master = (jax.tree.map(lambda p, i: gather_bits(p, i).astype(jnp.float32), params, mask)
              if master_weights else None)
    # Distinct buffers: the fused step donates the state, and a buffer cannot be donated twice.
    return SparseAdamWState(count=jnp.zeros([], jnp.int32), indices=mask, mu=mu, nu=nu,
                            master=master, skipped=jnp.zeros([], jnp.int32))


@functools.partial(jax.jit, inline=True)
def _bias_correction(decay, count):
    # Jitted as optax jits it: XLA's pow under jit and eager pow differ in the last bits,
    # which ``1 - decay**t`` amplifies by cancellation (1e-5 relative at t = 3).
    return 1 - decay**count


def adamw_scalars(count, learning_rate, b1, b2, eps, eps_root, weight_decay) -> AdamWScalars:
    """The step's runtime scalars, computed as optax does (bias corrections at ``count + 1``)."""
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    t = optax.safe_increment(count)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return AdamWScalars(
        learning_rate=f32(lr), b1=f32(b1), b2=f32(b2), eps=f32(eps), eps_root=f32(eps_root),
        weight_decay=f32(weight_decay),
        bias_correction1=f32(_bias_correction(b1, t)),
        bias_correction2=f32(_bias_correction(b2, t)),
        one_minus_b1=f32(1 - b1), one_minus_b2=f32(1 - b2))


def unzip_tree(tree_of_tuples: PyTree, n: int) -> tuple[PyTree, ...]:
    """A tree of n-tuples (one per tensor) as n trees."""
    is_tuple = lambda x: isinstance(x, tuple) and len(x) == n
    return tuple(jax.tree.map(lambda t, j=j: t[j], tree_of_tuples, is_leaf=is_tuple)
                 for j in range(n))


def _compressed_grads(grads: PyTree, params: PyTree, idx: PyTree) -> PyTree:
    """The gradient at the active entries of each tensor, from dense gradients (the
    params' shapes) or already compressed ones (the mask leaves' shapes)."""

    def one(path, grad, param, i):
        if grad.shape == param.shape:
            return gather(grad, i)
        if grad.shape == i.shape:
            return grad
        raise ValueError(f"gradient for {masks_lib.path_str(path)} has shape {grad.shape}, "
                         f"which fits neither its parameter {param.shape} nor its mask "
                         f"{i.shape}")

    return jax.tree_util.tree_map_with_path(one, grads, params, idx)


def check_dense_grads(grads: PyTree, params: PyTree) -> None:
    """Gradients must have exactly the params' shapes (a broadcastable wrong shape would
    leak updates onto off-mask entries through ``optax.apply_updates``)."""
    if jax.tree.structure(grads) != jax.tree.structure(params):
        raise ValueError("gradients and params differ in structure")

    def one(path, g, p):
        if g.shape != p.shape:
            raise ValueError(f"gradient for {masks_lib.path_str(path)} has shape {g.shape}, "
                             f"its parameter {p.shape}")

    jax.tree_util.tree_map_with_path(one, grads, params)


def _parts(tree: PyTree) -> list[jax.Array]:
    """The leaves of a compressed tree as few arrays: the flat ones concatenated (one
    reduction compiles faster than hundreds), the row-balanced ones as they are (so a
    row-sharded leaf is reduced where it lives)."""
    leaves = [x for x in jax.tree.leaves(tree) if x.size]
    flat = [x.astype(jnp.float32) for x in leaves if x.ndim <= 1]
    parts = [x.astype(jnp.float32) for x in leaves if x.ndim > 1]
    if flat:
        parts.append(jnp.concatenate([x.reshape(-1) for x in flat]))
    return parts


def global_norm(tree: PyTree) -> jax.Array:
    """``sqrt(sum of squares)`` of every value of ``tree`` (as ``optax.global_norm``)."""
    parts = _parts(tree)
    if not parts:
        return jnp.zeros([], jnp.float32)
    return jnp.sqrt(sum(jnp.sum(x * x) for x in parts))


def clip_compressed(grads: PyTree, max_norm: float | None
                    ) -> tuple[PyTree, jax.Array | None]:
    """Scales ``grads`` to global norm at most ``max_norm`` and returns the norm before
    clipping; with ``max_norm`` None, ``(grads, None)``. On compressed gradients this is
    the norm of ``mask * g``."""
    if max_norm is None:
        return grads, None
    norm = global_norm(grads)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads), norm


def all_finite(tree: PyTree) -> jax.Array:
    parts = _parts(tree)
    if not parts:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in parts]))


def _select(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _advance(state: SparseAdamWState, mu, nu, master) -> SparseAdamWState:
    """The state after a step that was taken."""
    return state._replace(count=state.count + 1, mu=mu, nu=nu, master=master)


# ----------------------------------------------------------------------------- optax transform


def sparse_adamw(mask: PyTree, learning_rate: ScalarOrSchedule, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                 weight_decay: float = 1e-4, *, mu_dtype: Any = None,
                 skip_nonfinite: bool = False,
                 backend: str = "auto") -> optax.GradientTransformationExtraArgs:
    """AdamW restricted to the entries of ``mask``, with state of size ``k``, not ``N``.

    The update rule and defaults are those of ``optax.adamw`` (Loshchilov & Hutter's
    decoupled weight decay, multiplied by the learning rate), applied only at the
    active entries; off the mask the updates are exactly zero (``-0.0``, the zero that
    leaves every param bit for bit under addition), whatever the gradient holds there.
    ``learning_rate`` may be a schedule of the step count. Works under
    ``optax.inject_hyperparams`` and after ``optax.clip_by_global_norm``.

    Moments are kept in float32 (``mu`` in ``mu_dtype`` if given), even for bf16
    params: at ``k`` entries this costs little and loses nothing.

    Args:
      mask: a pytree of int32 index arrays (:mod:`sparsejax.masks`) shaped like the params.
      learning_rate, b1, b2, eps, eps_root, weight_decay: as in ``optax.adamw``.
      mu_dtype: storage dtype of the first moment (default float32).
      skip_nonfinite: if a gradient value at an active entry is not finite, return zero
        updates (``-0.0``, so ``optax.apply_updates`` leaves every param bit for bit) and
        leave the state unchanged but for ``state.skipped``.
      backend: see :mod:`sparsejax.backends`; the transform computes the update values
        with ``xla`` ops whatever the backend, since it must build dense updates.
    """
    _check_mask(mask)
    backends.resolve_backend(backend)  # validate the name early

    def init_fn(params):
        return _init_state(mask, params, mu_dtype, master_weights=False)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("sparse_adamw needs params (weight decay); call "
                             "update(grads, state, params)")
        check_dense_grads(updates, params)
        idx = state.indices
        g = jax.tree.map(gather, updates, idx)
        s = adamw_scalars(state.count, learning_rate, b1, b2, eps, eps_root, weight_decay)
        ok = all_finite(g) if skip_nonfinite else jnp.array(True)
        out = jax.tree.map(
            lambda x, g_, i, m, v: adamw_math.adamw_delta(
                gather(x, i).astype(jnp.float32), g_.astype(jnp.float32),
                m.astype(jnp.float32), v, s),
            params, g, idx, state.mu, state.nu)
        delta, mu, nu = unzip_tree(out, 3)
        mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
        # Off the mask, and everywhere on a skipped step, the update is -0.0: x + -0.0 == x
        # bit for bit for every x (+0.0 would turn a -0.0 param into +0.0).
        dense = jax.tree.map(
            lambda u, i, d: scatter(jnp.full_like(u, -0.0), i,
                                    jnp.where(ok, d, -0.0).astype(u.dtype)),
            updates, idx, delta)
        taken = _advance(state, mu, nu, None)
        new_state = _select(ok, taken, state)._replace(
            skipped=state.skipped + 1 - ok.astype(jnp.int32))
        return dense, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- fused step


class FusedOptimizer(NamedTuple):
    """A fused optimizer (the sparse AdamW, or :func:`sparsejax.optim.dense.dense_adamw`):
    ``init(params) -> state`` and the step.

    ``update(params, grads, state) -> (params, state, info)`` is pure, to call inside
    a larger jitted train step; ``step`` is the same function jitted with the params
    and state donated, so the ``k`` writes happen in place.
    """

    init: Callable[[PyTree], SparseAdamWState]
    update: Callable[[PyTree, PyTree, SparseAdamWState],
                     tuple[PyTree, SparseAdamWState, StepInfo]]
    step: Callable[[PyTree, PyTree, SparseAdamWState],
                   tuple[PyTree, SparseAdamWState, StepInfo]]


FusedSparseAdamW = FusedOptimizer  # the name of earlier releases


def fused_sparse_adamw(mask: PyTree, learning_rate: ScalarOrSchedule, b1: float = 0.9,
                       b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                       weight_decay: float = 1e-4, *, mu_dtype: Any = None,
                       master_weights: bool = False, skip_nonfinite: bool = False,
                       max_grad_norm: float | None = None, backend: str = "auto",
                       tensors_per_launch: int = 1) -> FusedOptimizer:
    """Sparse AdamW that writes only the ``k`` active entries of the params.

    Same hyperparameters, rule and state as :func:`sparse_adamw`, without a dense
    update: each tensor's active params and gradients are gathered, the moments
    updated, and the new values scattered back (in place when the params are donated).

    Args:
      grads passed to the step may be dense (params' shapes) or compressed (each leaf
      shaped like its mask leaf: the gradient values at the active entries).
      master_weights: keep a float32 copy of the active values in the state and step
        it, writing its rounding into the params (for bf16 params).
      skip_nonfinite: if any active gradient value is not finite, return the params
        and state exactly as they came in, bit for bit (but for ``state.skipped``), and
        report ``info.skipped``. On the ``xla`` backend the guard is selects on the
        ``k``-vectors and a scatter that writes nothing when skipping (about the
        unguarded step's time, params still written in place); the Pallas backends
        skip with a ``lax.cond`` around the step.
      max_grad_norm: clip the active gradient to this global norm first (the norm of
        ``mask * g``; None: no clipping). ``info.grad_norm`` is the norm before it.
      backend: ``"auto"``, ``"xla"``, ``"pallas"`` or ``"interpret"``
        (:mod:`sparsejax.backends`).
      tensors_per_launch: with a Pallas backend, step up to this many tensors per
        kernel launch (:func:`sparsejax.kernels.indexed_adamw.indexed_adamw_multi_step`)
        instead of one launch per tensor; same numbers. Whether it pays depends on the
        GPU's launch overhead against the per-tensor work (``bench_optimizer.py``).
    """
    _check_mask(mask)
    backend = backends.resolve_backend(backend)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 (or None), got {max_grad_norm}")
    if tensors_per_launch < 1:
        raise ValueError(f"tensors_per_launch must be >= 1, got {tensors_per_launch}")

    def init_fn(params):
        return _init_state(mask, params, mu_dtype, master_weights)

    def step_fn(params, g, state, s, ok=None):
        """The step proper on compressed, clipped gradients; with ``ok`` (xla backend) a
        guarded step that leaves everything as it was where ``ok`` is False."""
        idx = state.indices
        master = state.master if state.master is not None else jax.tree.map(lambda _: None, idx)
        if tensors_per_launch > 1 and backend != "xla":
            new_params, mu, nu, new_master = _step_batched(
                params, g, idx, state.mu, state.nu, master, s, backend, tensors_per_launch)
        else:
            out = jax.tree.map(
                lambda p, g_, i, m, v, w: _step_tensor(p, g_, i, m, v, w, s, backend, ok),
                params, g, idx, state.mu, state.nu, master, is_leaf=lambda x: x is None)
            new_params, mu, nu, new_master = unzip_tree(out, 4)
        new_state = _advance(state, mu, nu, new_master if state.master is not None else None)
        if ok is not None:
            taken = ok.astype(jnp.int32)
            new_state = new_state._replace(count=state.count + taken,
                                           skipped=state.skipped + 1 - taken)
        return new_params, new_state

    def update_fn(params, grads, state):
        if master_weights and state.master is None:
            raise ValueError("master_weights=True needs a state from this optimizer's init")
        g = _compressed_grads(grads, params, state.indices)
        g, norm = clip_compressed(g, max_grad_norm)
        s = adamw_scalars(state.count, learning_rate, b1, b2, eps, eps_root, weight_decay)
        if not skip_nonfinite:
            new_params, new_state = step_fn(params, g, state, s)
            return new_params, new_state, StepInfo(jnp.array(False), norm)
        # A skipped step returns its inputs untouched: bit for bit, signed zeros and
        # subnormals included (no arithmetic touches them).
        ok = all_finite(g)
        if backend == "xla":  # selects on the k entries, scatters that write nothing
            new_params, new_state = step_fn(params, g, state, s, ok)
        else:  # a kernel reads and writes the params itself: skip it as a whole
            new_params, new_state = jax.lax.cond(
                ok, step_fn,
                lambda p, g_, st, s_: (p, st._replace(skipped=st.skipped + 1)),
                params, g, state, s)
        return new_params, new_state, StepInfo(jnp.logical_not(ok), norm)

    return FusedOptimizer(init_fn, update_fn, jax.jit(update_fn, donate_argnums=(0, 2)))

