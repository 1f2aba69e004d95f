"""Reading and writing a tensor at a mask leaf (flat ``(k,)`` or row-balanced ``(rows, c)``).

The row-balanced layout is gathered and scattered row by row, so the work stays local
to the rows a device holds when a tensor is sharded along its leading axis (FSDP).
``gather_bits`` / ``scatter_bits`` move bit patterns (bf16 as uint16), which XLA's CPU
backend does without converting the whole tensor. Re-exported by :mod:`sparsejax.optim`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_cols(x: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` as ``(rows, cols)`` and the row-balanced flat indices as column indices."""
    rows = idx.shape[0]
    x2 = x.reshape(rows, -1)
    offsets = (jnp.arange(rows, dtype=jnp.int32) * x2.shape[1])[:, None]
    return x2, idx - offsets


def gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """The entries of ``x`` at the mask leaf ``idx``, shaped like ``idx``."""
    if idx.ndim == 1:
        return x.reshape(-1)[idx]
    x2, cols = _row_cols(x, idx)
    return jax.vmap(lambda row, c: row[c])(x2, cols)


def scatter(x: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    """``x`` with the entries at the mask leaf ``idx`` set to ``values`` (in place if donated)."""
    if idx.ndim == 1:
        return x.reshape(-1).at[idx].set(
            values, indices_are_sorted=True, unique_indices=True).reshape(x.shape)
    x2, cols = _row_cols(x, idx)
    out = jax.vmap(lambda row, c, v: row.at[c].set(v, indices_are_sorted=True,
                                                   unique_indices=True))(x2, cols, values)
    return out.reshape(x.shape)


def as_bits(x: jax.Array) -> jax.Array:
    """``x`` reinterpreted as unsigned integers of its width (a free bitcast)."""
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32,
                                            8: jnp.uint64}[x.dtype.itemsize])


def gather_bits(x: jax.Array, idx: jax.Array) -> jax.Array:
    """:func:`gather` moving bit patterns: the same values, bit for bit. XLA's CPU backend
    converts a whole bf16 tensor to float32 around a gather or scatter (O(N) work and
    memory per step); moving 16-bit integers keeps the optimizer's step O(k). Not
    differentiable (use :func:`gather` under ``jax.grad``)."""
    return jax.lax.bitcast_convert_type(gather(as_bits(x), idx), x.dtype)


def scatter_bits(x: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    """:func:`scatter` moving bit patterns (see :func:`gather_bits`); ``values`` are first
    cast to ``x``'s dtype. Not differentiable."""
    out = scatter(as_bits(x), idx, as_bits(values.astype(x.dtype)))
    return jax.lax.bitcast_convert_type(out, x.dtype)
