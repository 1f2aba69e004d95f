"""Sampled dense-dense product as a Pallas kernel (Triton backend): the sparse weight gradient.

Implements the contract of :func:`sparsejax.backends.xla_sampled_product`: for the
active entries ``(a_j, b_j)`` of a ``[in, out]`` weight,

    out[j] = sum_t xt[a_j, t] * dyt[b_j, t]        (float32 products and sums)

where ``xt = x^T [in, T]`` and ``dyt = dy^T [out, T]`` are the layer input and output
cotangent, transposed so that each entry reads two contiguous rows.

Layout of one launch:

* a 1-D grid over blocks of ``block_entries`` active entries (a power of two; the last
  block is ragged, so loads and the store are masked with ``lane < k``);
* each program loops over the tokens in tiles of ``block_tokens`` (a power of two; the
  last tile is masked with ``t < T``), loading two ``[block_entries, block_tokens]``
  tiles by gathered addresses ``a_j * T + t`` and ``b_j * T + t`` (every row of a tile
  is contiguous, so the loads coalesce) and accumulating their row-wise products in a
  float32 register vector;
* ``xt`` and ``dyt`` are passed whole, flattened (no ``BlockSpec``): only the rows of
  active entries are read. Masked lanes use entry 0 / the last token as addresses
  (always in bounds: the CPU interpreter dereferences masked lanes too) and
  ``other=0`` as values;
* the output is written once, by a contiguous masked store of the program's window.

Backends: ``interpret=False`` lowers through Pallas' Triton backend (selected by
:class:`jax.experimental.pallas.triton.CompilerParams`); ``interpret=True`` runs the
same kernel on CPU. :func:`sampled_product` is the seam used by
:func:`sparsejax.backends.sampled_product_fn`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

__all__ = ["DEFAULT_BLOCK_ENTRIES", "DEFAULT_BLOCK_TOKENS", "sampled_product"]

DEFAULT_BLOCK_ENTRIES = 64
"""Active entries per program."""

DEFAULT_BLOCK_TOKENS = 64
"""Tokens per loop iteration (tiles of 64 x 64 float32 per operand: 32 values per thread)."""

_NUM_WARPS = 4
_NUM_STAGES = 2
_MAX_FLAT = int(np.iinfo(np.int32).max)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _kernel(a_ref: Any, b_ref: Any, xt_ref: Any, dyt_ref: Any, out_ref: Any, *, k: int,
            tokens: int, block_entries: int, block_tokens: int) -> None:
    start = pl.program_id(0) * block_entries
    valid = start + jnp.arange(block_entries, dtype=jnp.int32) < k
    window = pl.ds(start, block_entries)
    a = pltriton.load(a_ref.at[window], mask=valid, other=0)
    b = pltriton.load(b_ref.at[window], mask=valid, other=0)
    a_base, b_base = (a * tokens)[:, None], (b * tokens)[:, None]

    def tile(j, acc):
        t = j * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        mask = valid[:, None] & (t < tokens)[None, :]
        t = jnp.minimum(t, tokens - 1)[None, :]
        x = pltriton.load(xt_ref.at[a_base + t], mask=mask, other=0).astype(jnp.float32)
        dy = pltriton.load(dyt_ref.at[b_base + t], mask=mask, other=0).astype(jnp.float32)
        return acc + jnp.sum(x * dy, axis=1)

    acc = jax.lax.fori_loop(0, pl.cdiv(tokens, block_tokens), tile,
                            jnp.zeros((block_entries,), jnp.float32))
    pltriton.store(out_ref.at[window], acc, mask=valid)


def _build_call(k: int, tokens: int, *, block_entries: int, block_tokens: int,
                interpret: bool):
    """The ``pallas_call`` (no validation: the lowering tests build invalid ones)."""
    return pl.pallas_call(
        functools.partial(_kernel, k=k, tokens=tokens, block_entries=block_entries,
                          block_tokens=block_tokens),
        out_shape=jax.ShapeDtypeStruct((k,), jnp.float32),
        grid=(pl.cdiv(k, block_entries),),
        compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS,
                                                num_stages=_NUM_STAGES),
        interpret=interpret,
        name="sampled_matmul",
    )


def sampled_product(xt: jax.Array, dyt: jax.Array, a: jax.Array, b: jax.Array, *,
                    interpret: bool = False, block_entries: int = DEFAULT_BLOCK_ENTRIES,
                    block_tokens: int = DEFAULT_BLOCK_TOKENS) -> jax.Array:
    """``out[j] = sum_t xt[a[j], t] * dyt[b[j], t]`` in float32, with the Pallas kernel.

    Same arguments, result and guarantees as
    :func:`sparsejax.backends.xla_sampled_product` (``xt [in, T]``, ``dyt [out, T]``,
    ``a, b (k,)`` int32), plus ``interpret`` and the two power-of-two block sizes.
    ``k = 0`` launches nothing. The sums run in a different order than the XLA path's,
    so results agree to float32 rounding, not bitwise.
    """
    for name, v in (("block_entries", block_entries), ("block_tokens", block_tokens)):
        if not _is_power_of_two(v):
            raise ValueError(f"{name} must be a power of two, got {v}")
    if xt.ndim != 2 or dyt.ndim != 2 or xt.shape[1] != dyt.shape[1]:
        raise ValueError(f"xt {xt.shape} and dyt {dyt.shape} must be [in, T] and [out, T]")
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a {a.shape} and b {b.shape} must be equal (k,) vectors")
    if max(xt.size, dyt.size) > _MAX_FLAT:
        raise ValueError(f"xt {xt.shape} / dyt {dyt.shape} exceed int32 addressing; "
                         "chunk the tokens")
    k, tokens = a.shape[0], xt.shape[1]
    if k == 0 or tokens == 0:
        return jnp.zeros((k,), jnp.float32)
    block_entries = min(block_entries, max(16, pl.next_power_of_2(k)))
    call = _build_call(k, tokens, block_entries=block_entries, block_tokens=block_tokens,
                       interpret=interpret)
    return call(a.astype(jnp.int32), b.astype(jnp.int32), xt.reshape(-1), dyt.reshape(-1))
