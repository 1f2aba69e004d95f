"""Memory-bounded attention in plain JAX: query/key chunks with an online softmax.

:func:`chunked_attention` computes exactly what the decoder's full-score XLA attention
computes (grouped-query attention, float32 scores and softmax, a boolean ``[B, T, S]``
mask whose masked scores are ``finfo(float32).min``), but never holds more than one
``[B, heads, chunk_q, chunk_k]`` block of float32 scores, in the forward pass and in
the backward pass (a ``jax.custom_vjp`` that recomputes each block from ``q, k, v``
and the saved float32 row statistics, as FlashAttention does; Dao et al. 2022,
arXiv 2205.14135). Its float memory grows with ``T + S``, not with ``T x S``; the
caller's boolean mask (one byte per entry, shared by every layer) is read block by
block, not copied (unless ``T`` or ``S`` is not a multiple of its chunk: then it is
padded once).

Math per query row, over key blocks ``j``: ``m_j = max(m_{j-1}, max_c s_jc)``,
``l_j = l_{j-1} exp(m_{j-1} - m_j) + sum_c exp(s_jc - m_j)``, and the same recurrence
for ``acc = sum_c exp(s_c - m) v_c``; the output is ``acc / l``. Backward, with
``p = exp(s - m) / l`` recomputed per block and ``D = rowsum(dO * O)``:
``dV = p^T dO``, ``dS = p (dO V^T - D)`` (zero where the mask is False, as the
``where`` of the full version makes it), ``dQ = dS K / sqrt(d)``, ``dK = dS^T Q / sqrt(d)``.

Semantics kept from the full version: a row whose keys are all masked attends
uniformly to all ``S`` keys (its scores are all ``finfo.min``); the padding this
function adds to reach whole chunks is excluded exactly (``-inf``), so ragged
lengths give the same numbers as the unchunked computation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_MASKED = float(jnp.finfo(jnp.float32).min)


def _pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


class _Blocks:
    """The inputs laid out chunk-major: the loops index their leading axis."""

    def __init__(self, q, k, v, mask, chunk_q, chunk_k):
        b, t, h, d = q.shape
        s, kv = k.shape[1], k.shape[2]
        self.shape = (b, t, h, d, s, kv, h // kv)
        self.cq, self.ck = min(chunk_q, t), min(chunk_k, s)
        self.nq, self.nk = -(-t // self.cq), -(-s // self.ck)
        tp, sp = self.nq * self.cq, self.nk * self.ck
        g = h // kv
        # q: [nq, B, cq, kv, g, D]; k, v: [nk, B, ck, kv, D]; mask: [nq, nk, B, cq, ck].
        self.q = _pad_to(q, 1, tp).reshape(b, self.nq, self.cq, kv, g, d).transpose(
            1, 0, 2, 3, 4, 5)
        self.k = _pad_to(k, 1, sp).reshape(b, self.nk, self.ck, kv, d).transpose(1, 0, 2, 3, 4)
        self.v = _pad_to(v, 1, sp).reshape(b, self.nk, self.ck, kv, d).transpose(1, 0, 2, 3, 4)
        # The mask stays [B, T, S] (padded only when T or S is ragged); blocks are sliced.
        self._mask = _pad_to(_pad_to(mask.astype(bool), 1, tp, False), 2, sp, False)
        self.key_real = (jnp.arange(sp) < s).reshape(self.nk, self.ck)
        self.q_index, self.k_index = jnp.arange(self.nq), jnp.arange(self.nk)
        self.scale = d ** -0.5

    def rows(self, x):
        """``[B, T, H, ...]`` -> chunk-major ``[nq, B, kv, g, cq, ...]`` (float32)."""
        b, t, h, d, s, kv, g = self.shape
        x = _pad_to(x.astype(jnp.float32), 1, self.nq * self.cq)
        x = x.reshape(b, self.nq, self.cq, kv, g, *x.shape[3:])
        return jnp.moveaxis(x, 2, 4).transpose(1, 0, 2, 3, 4, *range(5, x.ndim))

    def unrows(self, x, dtype):
        """Inverse of :meth:`rows` for ``[nq, B, kv, g, cq, D]`` -> ``[B, T, H, D]``."""
        b, t, h, d, s, kv, g = self.shape
        x = x.transpose(1, 0, 4, 2, 3, 5).reshape(b, self.nq * self.cq, h, d)
        return x[:, :t].astype(dtype)

    def mask_block(self, i, j):
        """``[B, cq, ck]`` bool block ``(i, j)`` of the mask."""
        return jax.lax.dynamic_slice(self._mask, (0, i * self.cq, j * self.ck),
                                     (self._mask.shape[0], self.cq, self.ck))

    def scores(self, qi, kj, mij, real_j):
        """float32 ``[B, kv, g, cq, ck]`` scores of one block, masked as the full version."""
        s = jnp.einsum("bqkgd,bckd->bkgqc", qi, kj,
                       preferred_element_type=jnp.float32) * self.scale
        s = jnp.where(mij[:, None, None], s, _MASKED)
        return jnp.where(real_j, s, -jnp.inf)


def _forward(q, k, v, mask, chunk_q, chunk_k):
    blk = _Blocks(q, k, v, mask, chunk_q, chunk_k)
    b, t, h, d, s, kv, g = blk.shape

    def query_chunk(args):
        qi, i = args

        def key_step(carry, xs):
            m, l, acc = carry
            kj, vj, j, real_j = xs
            sc = blk.scores(qi, kj, blk.mask_block(i, j), real_j)
            m_new = jnp.maximum(m, sc.max(axis=-1))
            p = jnp.exp(sc - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(axis=-1)
            acc = acc * corr[..., None] + jnp.einsum(
                "bkgqc,bckd->bkgqd", p.astype(v.dtype), vj,
                preferred_element_type=jnp.float32)
            return (m_new, l, acc), None

        stats = jnp.full((b, kv, g, blk.cq), _MASKED, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros((b, kv, g, blk.cq, d), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_step, init, (blk.k, blk.v, blk.k_index,
                                                       blk.key_real))
        return acc / l[..., None], m, l

    out, m, l = jax.lax.map(query_chunk, (blk.q, blk.q_index))
    return blk.unrows(out, q.dtype), (m, l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked(q, k, v, mask, chunk_q, chunk_k):
    return _forward(q, k, v, mask, chunk_q, chunk_k)[0]


def _chunked_fwd(q, k, v, mask, chunk_q, chunk_k):
    out, (m, l) = _forward(q, k, v, mask, chunk_q, chunk_k)
    return out, (q, k, v, mask, out, m, l)


def _chunked_bwd(chunk_q, chunk_k, res, d_out):
    q, k, v, mask, out, m, l = res
    blk = _Blocks(q, k, v, mask, chunk_q, chunk_k)
    b, t, h, d, s, kv, g = blk.shape
    do = blk.rows(d_out)  # [nq, B, kv, g, cq, D] float32
    delta = jnp.sum(do * blk.rows(out), axis=-1)  # [nq, B, kv, g, cq]
    inv_l = 1.0 / l

    def probs(qi, kj, mij, real_j, mi_, inv_li):
        sc = blk.scores(qi, kj, mij, real_j)
        return jnp.exp(sc - mi_[..., None]) * inv_li[..., None]

    def grad_s(p, doi, vj, deltai, mij):
        dp = jnp.einsum("bkgqd,bckd->bkgqc", doi, vj.astype(jnp.float32))
        return jnp.where(mij[:, None, None], p * (dp - deltai[..., None]), 0.0)

    # dQ: for each query chunk, a pass over the key chunks.
    def dq_chunk(args):
        qi, i, mi_, inv_li, doi, deltai = args

        def step(acc, xs):
            kj, vj, j, real_j = xs
            mij = blk.mask_block(i, j)
            p = probs(qi, kj, mij, real_j, mi_, inv_li)
            ds = grad_s(p, doi, vj, deltai, mij)
            return acc + jnp.einsum("bkgqc,bckd->bkgqd", ds, kj.astype(jnp.float32)), None

        acc, _ = jax.lax.scan(step, jnp.zeros_like(doi), (blk.k, blk.v, blk.k_index,
                                                          blk.key_real))
        return acc * blk.scale

    dq = jax.lax.map(dq_chunk, (blk.q, blk.q_index, m, inv_l, do, delta))

    # dK, dV: for each key chunk, a pass over the query chunks.
    def dkv_chunk(args):
        kj, vj, j, real_j = args

        def step(carry, xs):
            dk, dv = carry
            qi, i, mi_, inv_li, doi, deltai = xs
            mij = blk.mask_block(i, j)
            p = probs(qi, kj, mij, real_j, mi_, inv_li)
            dv = dv + jnp.einsum("bkgqc,bkgqd->bckd", p, doi)
            ds = grad_s(p, doi, vj, deltai, mij)
            dk = dk + jnp.einsum("bkgqc,bqkgd->bckd", ds, qi.astype(jnp.float32))
            return (dk, dv), None

        zeros = jnp.zeros((b, blk.ck, kv, d), jnp.float32)
        (dk, dv), _ = jax.lax.scan(step, (zeros, zeros),
                                   (blk.q, blk.q_index, m, inv_l, do, delta))
        return dk * blk.scale, dv

    dk, dv = jax.lax.map(dkv_chunk, (blk.k, blk.v, blk.k_index, blk.key_real))
    sp = blk.nk * blk.ck
    unkeys = lambda x, like: x.transpose(1, 0, 2, 3, 4).reshape(b, sp, kv, d)[:, :s].astype(
        like.dtype)
    return blk.unrows(dq, q.dtype), unkeys(dk, k), unkeys(dv, v), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                      chunk_q: int = 512, chunk_k: int = 512) -> jax.Array:
    """Masked grouped-query attention ``[B, T, H, D]`` in ``chunk_q x chunk_k`` blocks.

    Args:
        q: ``[B, T, H, D]`` queries; ``k, v``: ``[B, S, K, D]`` keys and values with
            ``H`` a multiple of ``K`` (GQA).
        mask: ``[B, T, S]`` bool, True where query ``t`` may see key ``s``.
        chunk_q, chunk_k: block sizes (clipped to ``T`` and ``S``); any ``T, S`` work,
            the last block is padded and the padding excluded exactly.

    Returns:
        The attention output in ``q``'s dtype; equal (to float32 rounding) to the
        full-score computation, with gradients for ``q, k, v`` from a backward pass
        that also holds one block of scores at a time.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"chunked_attention needs q [B,T,H,D] and k, v [B,S,K,D]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of kv heads "
                         f"{k.shape[2]}")
    if mask.shape != (q.shape[0], q.shape[1], k.shape[1]):
        raise ValueError(f"mask shape {mask.shape} is not [B, T, S] = "
                         f"{(q.shape[0], q.shape[1], k.shape[1])}")
    if chunk_q < 1 or chunk_k < 1:
        raise ValueError(f"chunk sizes must be >= 1, got {chunk_q}, {chunk_k}")
    return _chunked(q, k, v, mask, int(chunk_q), int(chunk_k))
