"""Decode-time attention of the rollout slots: a shared prompt part, then each slot's own keys.

The ``G`` samples of a prompt share its keys/values, so they are stored once per prompt
(``[P, kv_heads, D, Lp]``, left-aligned: prompt ``p``'s keys are its first
``prompt_len[p]`` positions) and each decode slot stores only the keys of the tokens it
generated (``[S, kv_heads, D, C]``). A decode step attends in two parts merged by online
softmax (running max ``m``, sum ``l`` and unnormalised output ``acc``, all float32):

1. :func:`prompt_attention_state`: the query against its prompt's keys. When the rows are
   the prompts' samples in order (row ``s`` holds prompt ``s // G``: ``grouped``), the
   ``G`` samples' queries go through one matrix product with their prompt's keys, which are
   read once per prompt instead of once per sample (on a CPU the prompt part of a
   GSM8K-length prompt is about half of what a step reads); otherwise each row's prompt
   keys are gathered.
2. :func:`chunked_decode_attention`: chunk by chunk over the generated keys that some
   live row fills, continuing from the prompt part's state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _softmax_state(scores: jax.Array, values: jax.Array, spec: str) -> tuple:
    """``(m, l, acc)`` of masked float32 ``scores [..., C]`` against ``values``: the running
    max, the sum of ``exp(scores - m)`` and the unnormalised weighted values."""
    m = jnp.max(scores, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(scores - m_safe[..., None])
    acc = jnp.einsum(spec, p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return m, jnp.sum(p, axis=-1), acc


def _merge(a: tuple, b: tuple) -> tuple:
    """Two online-softmax states of disjoint key sets as one (exactly ``b`` when ``a``
    has seen nothing)."""
    (ma, la, acca), (mb, lb, accb) = a, b
    m = jnp.maximum(ma, mb)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    ca, cb = jnp.exp(ma - m_safe), jnp.exp(mb - m_safe)
    return m, la * ca + lb * cb, acca * ca[..., None] + accb * cb[..., None]


def empty_state(s: int, kv: int, g: int, d: int) -> tuple:
    """The online-softmax state of no keys: ``(-inf, 0, 0)``."""
    return (jnp.full((s, kv, g), -jnp.inf, jnp.float32), jnp.zeros((s, kv, g), jnp.float32),
            jnp.zeros((s, kv, g, d), jnp.float32))


def prompt_attention_state(q: jax.Array, prompt_k: jax.Array, prompt_v: jax.Array,
                           prompt_len: jax.Array, row_prompt: jax.Array, grouped: bool,
                           num_chunks: jax.Array, chunk: int
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Online-softmax state of ``q [S, H, D]`` over each row's prompt keys.

    ``prompt_k [P, K, D, Lp]`` (transposed keys), ``prompt_v [P, K, Lp, D]``,
    ``prompt_len [P]`` (keys at positions ``>= prompt_len`` are ignored), ``row_prompt
    [S]`` the prompt of each row. ``grouped``: the rows are ``S // P`` samples of each
    prompt in order (``row_prompt`` is then not read). Reads the first ``num_chunks``
    chunks of ``chunk`` positions (``Lp`` a multiple of ``chunk``). Returns ``(m [S, K,
    H/K], l [S, K, H/K], acc [S, K, H/K, D])`` float32 for
    :func:`chunked_decode_attention`'s ``init``.
    """
    s, h, d = q.shape
    num_prompts, kv = prompt_k.shape[:2]
    g = h // kv
    n = s // num_prompts
    scale = d ** -0.5
    # grouped: [P, K, n * g, D], a prompt's samples' queries side by side
    qp = (q.reshape(num_prompts, n, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(
        num_prompts, kv, n * g, d) if grouped else q.reshape(s, kv, g, d))
    rows = lambda x: x.reshape(num_prompts, kv, n, g, *x.shape[3:]).swapaxes(1, 2).reshape(
        s, kv, g, *x.shape[3:])

    def body(c, state):
        k_, v_, c = jax.lax.optimization_barrier((prompt_k, prompt_v, c))  # as below
        start = c * chunk
        kc = jax.lax.dynamic_slice_in_dim(k_, start, chunk, axis=3)
        vc = jax.lax.dynamic_slice_in_dim(v_, start, chunk, axis=2)
        ok = (start + jnp.arange(chunk)) < prompt_len[:, None]                  # [P, c]
        if grouped:
            scores = jnp.einsum("pkmd,pkdc->pkmc", qp, kc,
                                preferred_element_type=jnp.float32) * scale
            part = _softmax_state(jnp.where(ok[:, None, None], scores, -jnp.inf), vc,
                                  "pkmc,pkcd->pkmd")
            part = tuple(rows(x) for x in part)
        else:
            scores = jnp.einsum("skgd,skdc->skgc", qp, kc[row_prompt],
                                preferred_element_type=jnp.float32) * scale
            part = _softmax_state(jnp.where(ok[row_prompt][:, None, None], scores, -jnp.inf),
                                  vc[row_prompt], "skgc,skcd->skgd")
        return _merge(state, part)

    return jax.lax.fori_loop(0, num_chunks, body, empty_state(s, kv, g, d))


def chunked_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, fill: jax.Array,
                             num_chunks: jax.Array, chunk: int, init: tuple | None = None
                             ) -> jax.Array:
    """Grouped-query attention of one query per row over its first ``fill`` keys.

    ``q [S, H, D]``, ``k [S, K, D, C]`` (transposed keys), ``v [S, K, C, D]``,
    ``fill [S]`` int; reads the first ``num_chunks`` chunks of ``chunk`` keys; returns
    ``[S, H, D]``. Online softmax in float32, continuing from ``init`` (the ``(m, l, acc)``
    of :func:`prompt_attention_state`) if given; a chunk past a row's ``fill`` leaves that
    row's running sums bit-for-bit unchanged, and a row that attends to nothing gets zeros.
    """
    s, h, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(s, kv, h // kv, d)
    scale = d ** -0.5

    def body(c, carry):
        m, l, acc = carry
        # A barrier with the loop index, so that XLA:CPU cannot hoist a float32 copy
        # of the whole bf16 cache out of the loop (only a chunk is converted).
        k_, v_, c = jax.lax.optimization_barrier((k, v, c))
        start = c * chunk
        kc = jax.lax.dynamic_slice_in_dim(k_, start, chunk, axis=3)
        vc = jax.lax.dynamic_slice_in_dim(v_, start, chunk, axis=2)
        ok = (start + jnp.arange(chunk))[None, None, None, :] < fill[:, None, None, None]
        scores = jnp.einsum("skgd,skdc->skgc", qg, kc,
                            preferred_element_type=jnp.float32) * scale
        scores = jnp.where(ok, scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(scores - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("skgc,skcd->skgd", p.astype(v.dtype), vc,
                        preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

    if init is None:
        init = empty_state(s, kv, h // kv, d)
    _, l, acc = jax.lax.fori_loop(0, num_chunks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(s, h, d).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class SlotCache:
    """One layer's decode-slot cache; :class:`~sparsejax.models.decoder.Attention` calls
    :meth:`attend` instead of its own cache update when it gets one of these.

    ``k [S, kv_heads, D, C]`` (keys transposed: the score dot then reads ``C``
    contiguously, about 2x faster on XLA's CPU than ``[S, kv, C, D]``), ``v [S, kv_heads,
    C, D]``: the keys/values of each row's generated tokens (``C`` a multiple of
    ``chunk``); ``write [S]`` the slot each row's new key goes to; ``fill [S]`` how many
    leading slots each row attends to (the new one included); ``num_chunks`` how many
    leading chunks any row needs; ``prompt_k, prompt_v, prompt_len, row_prompt`` and
    ``grouped``, ``prompt_chunks``: the shared prompt part (:func:`prompt_attention_state`).
    """

    k: jax.Array
    v: jax.Array
    write: jax.Array
    fill: jax.Array
    num_chunks: jax.Array
    prompt_k: jax.Array
    prompt_v: jax.Array
    prompt_len: jax.Array
    row_prompt: jax.Array
    prompt_chunks: jax.Array
    chunk: int
    grouped: bool

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array):
        """Writes one new ``k, v [S, 1, kv, D]`` per row and attends ``q [S, 1, H, D]``."""
        rows = jnp.arange(q.shape[0])
        kc = self.k.at[rows, :, :, self.write].set(k[:, 0].astype(self.k.dtype))
        vc = self.v.at[rows, :, self.write].set(v[:, 0].astype(self.v.dtype))
        state = prompt_attention_state(q[:, 0], self.prompt_k, self.prompt_v, self.prompt_len,
                                       self.row_prompt, self.grouped, self.prompt_chunks,
                                       self.chunk)
        out = chunked_decode_attention(q[:, 0], kc, vc, self.fill, self.num_chunks,
                                       self.chunk, init=state)
        return out[:, None], dataclasses.replace(self, k=kc, v=vc)


jax.tree_util.register_dataclass(
    SlotCache, data_fields=["k", "v", "write", "fill", "num_chunks", "prompt_k", "prompt_v",
                            "prompt_len", "row_prompt", "prompt_chunks"],
    meta_fields=["chunk", "grouped"])
