"""The routed-expert MLP of a mixture-of-experts layer (Qwen3-MoE's sparse MoE block).

A linear router without bias scores the ``E`` experts of each token; the softmax of the
scores (in float32) is cut to its top ``k`` entries, renormalised to sum to 1 when
``norm_topk_prob``, and each token's output is the weighted sum of its ``k`` experts'
SwiGLU MLPs::

    p = softmax(x @ gate)                     # [tokens, E], float32
    w, e = top_k(p, k); w /= sum(w) if norm_topk_prob
    y = sum_j w_j * down[e_j](silu(gate_proj[e_j](x)) * up_proj[e_j](x))

Layout: the expert weights are stacked per layer, in the ``(in, out)`` orientation of
the dense MLP's kernels (the transpose of each HF ``nn.Linear`` weight):
``gate_proj, up_proj: [E, hidden, moe_intermediate]``, ``down_proj: [E,
moe_intermediate, hidden]``; the router ``gate.kernel`` is ``[hidden, E]``. Slice ``e``
of a stacked weight is expert ``e``'s kernel, so HF's per-expert tensors
``mlp.experts.{e}.gate_proj.weight`` are its slices transposed.

Compute: only the routed token-expert pairs are computed. The ``tokens x k``
assignments are sorted by expert, the tokens gathered in that order, and each
projection is one grouped matmul (:func:`jax.lax.ragged_dot`: rows ``[start_e,
start_e + n_e)`` times expert ``e``'s kernel) over the ``tokens x k`` rows; the results
go back to token order and are combined with the routing weights. On GPU and TPU
``ragged_dot`` is a native grouped matmul. XLA:CPU lowers it to a dense matmul over all
experts with masked rows (``E`` times the arithmetic and an ``[E, rows, in]`` buffer),
so on CPU the grouped matmul is :func:`tiled_grouped_matmul`, a loop over row tiles with
the same values.

:func:`load_balancing_loss` is the Switch-Transformer auxiliary loss exactly as
transformers' ``load_balancing_loss_func`` computes it from the router logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models import ops
from sparsejax.models.config import DecoderConfig

__all__ = ["Experts", "MoE", "Router", "grouped_matmul", "grouped_matmul_dx",
           "load_balancing_loss", "route", "take_slice", "tiled_grouped_matmul"]


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def grouped_matmul(x: jax.Array, w, group_sizes: jax.Array, *, impl: str = "auto"
                   ) -> jax.Array:
    """``y[r] = x[r] @ w[g(r)]`` where rows come in consecutive groups, group ``e`` of
    ``group_sizes[e]`` rows using ``w[e]``; ``x [M, in]``, ``w [E, in, out]``.

    Rows past ``sum(group_sizes)`` are zero. Low-precision operands are multiplied and
    summed in float32 and rounded once (as :func:`sparsejax.models.ops.matmul`); a weight
    object with ``grouped_rmatmul(x, group_sizes)`` computes the product itself.

    ``impl``: ``"ragged"`` (:func:`jax.lax.ragged_dot`, a native grouped matmul on GPU
    and TPU), ``"tiled"`` (:func:`tiled_grouped_matmul`), or ``"auto"``: tiled on CPU,
    where ``ragged_dot`` becomes a dense matmul over all experts, else ragged.
    """
    if x.ndim != 2 or len(w.shape) != 3 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"grouped_matmul: x {x.shape} does not fit stacked weights of "
                         f"shape {w.shape}")
    if impl not in ("auto", "ragged", "tiled"):
        raise ValueError(f"grouped_matmul impl must be auto, ragged or tiled, got {impl!r}")
    if hasattr(w, "grouped_rmatmul"):
        return w.grouped_rmatmul(x, group_sizes)
    if impl == "tiled" or (impl == "auto" and jax.default_backend() == "cpu"):
        return tiled_grouped_matmul(x, w, group_sizes)
    if ops.is_low_precision(x, w):
        return jax.lax.ragged_dot(x, w, group_sizes,
                                  preferred_element_type=jnp.float32).astype(x.dtype)
    return jax.lax.ragged_dot(x, w, group_sizes)


# ----------------------------------------------------------------------------- tiled


TILE_ROWS = 128  # rows per tile of the tiled grouped matmul


def _tile_plan(group_sizes: jax.Array, rows: int, tile: int):
    """The (tile, group) pairs a tiled grouped matmul visits, as ``(tiles, groups,
    starts, ends)`` of static length ``ceil(rows / tile) + E - 1`` (an upper bound):
    visit ``v`` multiplies the rows of tile ``tiles[v]`` that lie in ``[starts[v],
    ends[v])`` by group ``groups[v]``'s weight; unused visits have an empty range."""
    num_groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // tile
    visits = jnp.where(group_sizes > 0, (jnp.maximum(ends, 1) - 1) // tile - first + 1, 0)
    offsets = jnp.cumsum(visits) - visits
    count = -(-rows // tile) + num_groups - 1
    v = jnp.arange(count)
    groups = jnp.clip(jnp.searchsorted(offsets + visits, v, side="right"), 0, num_groups - 1)
    used = v < jnp.sum(visits)
    tiles = jnp.where(used, first[groups] + v - offsets[groups], 0)
    return (tiles.astype(jnp.int32), groups.astype(jnp.int32),
            jnp.where(used, starts[groups], 0), jnp.where(used, ends[groups], 0))


def _tile_rows(plan, v, tile: int, rows: int):
    """``(start, group, valid)`` of visit ``v``: the window ``[start, start + tile)`` of the
    ``rows`` rows (the tile, moved back to end at the last row), and which of its rows the
    visit owns (in the tile proper and in the group), so that no operand is padded."""
    tiles, groups, starts, ends = plan
    first = tiles[v] * tile
    start = jnp.minimum(first, rows - tile)
    ids = start + jnp.arange(tile)
    return start, groups[v], (ids >= first) & (ids >= starts[v]) & (ids < ends[v])


def _tile_size(rows: int) -> int:
    return max(1, min(TILE_ROWS, rows))


def take_slice(a: jax.Array, start, size: int | None = None) -> jax.Array:
    """``a[start]`` (``size`` None) or ``a[start:start + size]``, a 16-bit ``a`` moved as
    integers: XLA:CPU slices a bf16 tensor through a float32 copy, which it would make of
    the whole stacked weight (and ``x``) once, outside the loop."""
    low = jnp.dtype(a.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if low:  # tied to the index, so that XLA cannot hoist the bitcast (a copy) either
        a, start = jax.lax.optimization_barrier((a, start))
    bits = jax.lax.bitcast_convert_type(a, jnp.uint16) if low else a
    part = (jax.lax.dynamic_index_in_dim(bits, start, keepdims=False) if size is None
            else jax.lax.dynamic_slice_in_dim(bits, start, size))
    return jax.lax.bitcast_convert_type(part, a.dtype) if low else part


def _tiled_product(x, w, plan, tile: int, rhs_dim: int, out_dtype):
    """``out[r] = x[r] . w[g(r)]`` contracting ``x``'s last axis with axis ``rhs_dim`` of
    ``w[g]`` (1: ``x @ w[g]``; 2: ``x @ w[g].T``), one tile-group visit at a time."""
    m = x.shape[0]
    out_cols = w.shape[3 - rhs_dim]

    def visit(v, out):
        start, g, valid = _tile_rows(plan, v, tile, m)
        xt, wg = take_slice(x, start, tile), take_slice(w, g)
        y = jax.lax.dot_general(xt, wg, (((1,), (rhs_dim - 1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        old = jax.lax.dynamic_slice_in_dim(out, start, tile)
        new = jnp.where(valid[:, None], y.astype(out.dtype), old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, start, 0)

    out = jnp.zeros((m, out_cols), out_dtype)
    return jax.lax.fori_loop(0, plan[0].shape[0], visit, out)


def _tiled_weight_grad(x, dy, plan, tile: int, num_groups: int):
    """``dw[g] = sum_{r in group g} x[r]^T dy[r]`` (float32), one visit at a time."""
    m = x.shape[0]

    def visit(v, dw):
        start, g, valid = _tile_rows(plan, v, tile, m)
        xt = jnp.where(valid[:, None], take_slice(x, start, tile), 0)
        dyt = take_slice(dy, start, tile)
        part = jax.lax.dot_general(xt, dyt, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(
            dw, jax.lax.dynamic_index_in_dim(dw, g, keepdims=False) + part, g, 0)

    dw = jnp.zeros((num_groups, x.shape[1], dy.shape[1]), jnp.float32)
    return jax.lax.fori_loop(0, plan[0].shape[0], visit, dw)


@jax.custom_vjp
def tiled_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """:func:`grouped_matmul` as a loop over ``TILE_ROWS``-row tiles of ``x``, each
    multiplied by the weight of every group it meets (at most ``tiles + E - 1`` tile
    products, forward and backward): the arithmetic of the routed rows only, and no
    buffer larger than the operands, the output and ``w``'s gradient (float32)."""
    tile = _tile_size(x.shape[0])
    plan = _tile_plan(group_sizes, x.shape[0], tile)
    return _tiled_product(x, w, plan, tile, 1, x.dtype)


def _tiled_fwd(x, w, group_sizes):
    return tiled_grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _tiled_bwd(res, dy):
    x, w, group_sizes = res
    tile = _tile_size(x.shape[0])
    plan = _tile_plan(group_sizes, x.shape[0], tile)
    dy = dy.astype(x.dtype) if ops.is_low_precision(x, w) else dy
    dx = _tiled_product(dy, w, plan, tile, 2, x.dtype)
    dw = _tiled_weight_grad(x, dy, plan, tile, w.shape[0]).astype(w.dtype)
    return dx, dw, None


tiled_grouped_matmul.defvjp(_tiled_fwd, _tiled_bwd)


def grouped_matmul_dx(dy: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                      impl: str = "auto") -> jax.Array:
    """``dx[r] = dy[r] @ w[g(r)].T``, the input gradient of :func:`grouped_matmul`
    (``dy [M, out]``, ``w [E, in, out]`` as stored: no transposed copy), in ``dy``'s
    dtype; ``impl`` as there."""
    if impl == "tiled" or (impl == "auto" and jax.default_backend() == "cpu"):
        tile = _tile_size(dy.shape[0])
        plan = _tile_plan(group_sizes, dy.shape[0], tile)
        return _tiled_product(dy, w, plan, tile, 2, dy.dtype)
    numbers = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(dy, w, group_sizes, numbers,
                                      preferred_element_type=jnp.float32).astype(dy.dtype)


def route(logits: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """``(weights [N, k] float32, experts [N, k] int32)`` of router ``logits [N, E]``:
    the top ``k`` of the float32 softmax, renormalised when ``norm_topk_prob``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def sort_by_expert(experts: jax.Array, num_experts: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(order, token, group_sizes)`` for ``experts [N, k]``: ``order`` lists the flat
    assignments ``n * k + j`` by expert (stable), ``token = order // k`` is the token of
    each sorted row, ``group_sizes [E]`` the rows per expert."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, order // experts.shape[-1], group_sizes


class Router(nnx.Module):
    """The router: ``logits = x @ kernel`` with a ``[hidden, E]`` kernel, no bias (HF's
    ``mlp.gate``); the kernel may be any weight object :func:`ops.matmul` applies."""

    def __init__(self, hidden: int, num_experts: int, *, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (hidden, num_experts), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.matmul(x, self.kernel[...])


class Experts(nnx.Module):
    """``E`` SwiGLU MLPs with stacked ``(in, out)`` kernels (see the module docstring)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype,
                 rngs: nnx.Rngs):
        self.gate_proj = nnx.Param(_normal(rngs, (num_experts, hidden, intermediate), dtype))
        self.up_proj = nnx.Param(_normal(rngs, (num_experts, hidden, intermediate), dtype))
        self.down_proj = nnx.Param(_normal(rngs, (num_experts, intermediate, hidden), dtype))

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Each expert's MLP on its group of the expert-sorted rows ``x [M, hidden]``."""
        gate = grouped_matmul(x, self.gate_proj[...], group_sizes)
        up = grouped_matmul(x, self.up_proj[...], group_sizes)
        return grouped_matmul(jax.nn.silu(gate) * up, self.down_proj[...], group_sizes)


class MoE(nnx.Module):
    """A sparse mixture-of-experts block: router, top-k routing, routed expert MLPs."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        c, dt = config, config.dtype
        if c.num_experts < 1:
            raise ValueError(f"MoE needs num_experts >= 1, got {c.num_experts}")
        self.num_experts, self.top_k = c.num_experts, c.num_experts_per_tok
        self.norm_topk_prob = c.norm_topk_prob
        self.gate = Router(c.hidden_size, c.num_experts, dtype=dt, rngs=rngs)
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size,
                               dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.with_router_logits(x)[0]

    def with_router_logits(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(y, router_logits)``: the block's output (shape and dtype of ``x [..., hidden]``)
        and the router logits ``[tokens, E]`` (tokens flattened, in ``x``'s dtype)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = self.gate(x2)
        weights, experts = route(logits, self.top_k, self.norm_topk_prob)
        order, token, group_sizes = sort_by_expert(experts, self.num_experts)
        y = self.experts(x2[token], group_sizes)                     # [N * k, hidden], sorted
        inverse = jnp.zeros_like(order).at[order].set(
            jnp.arange(order.shape[0], dtype=order.dtype))
        y = y[inverse].reshape(x2.shape[0], self.top_k, shape[-1])  # back to token order
        # transformers rounds the routing weights to the activation dtype before use.
        out = jnp.einsum("nkh,nk->nh", y, weights.astype(x.dtype),
                         preferred_element_type=jnp.float32)
        return out.astype(x.dtype).reshape(shape), logits


def load_balancing_loss(router_logits: Sequence[jax.Array], top_k: int,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    """The auxiliary load-balancing loss of transformers' ``load_balancing_loss_func``.

    ``E * sum_e f_e * P_e`` over all MoE layers together, where ``f_e`` is the number of
    top-``k`` assignments to expert ``e`` and ``P_e`` the summed router probability of
    ``e``, each divided by the number of (real) tokens summed over layers. ``router_logits``
    holds one ``[B * T, E]`` array per MoE layer; ``attention_mask [B, T]`` leaves pad
    tokens out. Gradients flow through the probabilities (the counts are constants).
    Returns float32 0 for an empty sequence (no MoE layer), as transformers does.
    """
    if not router_logits:
        return jnp.zeros((), jnp.float32)
    n, num_experts = router_logits[0].shape
    if top_k < 1 or top_k > num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    mask = (jnp.ones((n,), jnp.float32) if attention_mask is None
            else attention_mask.reshape(-1).astype(jnp.float32))
    if mask.shape[0] != n:
        raise ValueError(f"attention_mask has {mask.shape[0]} tokens, the router logits {n}")
    counts = jnp.zeros((num_experts,), jnp.float32)
    prob_sum = jnp.zeros((num_experts,), jnp.float32)
    for logits in router_logits:
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        _, experts = jax.lax.top_k(probs, top_k)
        counts = counts + jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(
            jnp.repeat(mask, top_k))
        prob_sum = prob_sum + jnp.sum(probs * mask[:, None], axis=0)
    rows = len(router_logits) * jnp.sum(mask)
    return num_experts * jnp.sum(jax.lax.stop_gradient(counts / rows) * (prob_sum / rows))
