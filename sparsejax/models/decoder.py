"""One Flax NNX decoder for Llama 3.x, Qwen2/Qwen2.5 and Qwen3 (dense and MoE).

The families differ only in configuration (:class:`DecoderConfig`): Qwen2 has
biases on the q/k/v projections, Qwen3 RMS-normalizes each query and key head before
RoPE (``qk_norm``: ``q_norm`` / ``k_norm``, weights of size ``head_dim``), Llama 3.1+
rescales the RoPE frequencies, sizes and tying differ. Everything else is the same
pre-norm transformer::

    h = embed[tokens]
    for each layer:
        h = h + o_proj(attention(rope(q_proj(rms(h))), rope(k_proj(rms(h))), v_proj(rms(h))))
        h = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
    logits = rms(h) @ (embed.T if tied else lm_head)

(with ``qk_norm``, ``rope(q_norm(q_proj(...)))`` and ``rope(k_norm(k_proj(...)))`` per head).
In a mixture-of-experts model (``qwen3_moe``) the MLP of each MoE layer
(:meth:`DecoderConfig.is_moe_layer`) is the routed-expert block of
:mod:`sparsejax.models.moe`; the other layers keep the dense MLP.

Layout: every kernel is a 2-D ``(in, out)`` matrix (the transpose of the HF
``nn.Linear`` weight), so each parameter corresponds to exactly one HF tensor and the
sparse-mask tools see the same matrices that HF checkpoints hold; the experts' kernels
are stacked ``[E, in, out]``, slice ``e`` being expert ``e``'s HF tensor transposed. The
params are the ordinary pytree ``nnx.split(model)[1]``; :func:`apply` and
:func:`hidden_states` are pure functions of ``(graphdef, params, ...)`` for ``jax.grad``
and ``jax.jit``.

Numerics: parameters and activations use ``config.param_dtype``; RMSNorm statistics,
RoPE, attention softmax and the output logits are float32.

Padding: batches are LEFT padded. Positions are computed from the attention mask
(``cumsum(mask) - 1``), so a left-padded row produces the same values at its real
tokens as the unpadded row. Pad queries attend only to themselves (never to an empty
set), so no NaN can appear anywhere, also in gradients.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models import ops
from sparsejax.models.attention import chunked_attention
from sparsejax.models.config import DecoderConfig
from sparsejax.models.moe import MoE


class LayerCache(NamedTuple):
    """Key/value cache of one layer: ``k``, ``v`` of shape ``[B, S, kv_heads, head_dim]``."""

    k: jax.Array
    v: jax.Array


def _normal(rngs: nnx.Rngs, shape, dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)`` with a ``(in, out)`` kernel (a plain array, a
    :class:`~sparsejax.sparse_backward.SparseWeight` whose gradient is its active entries,
    or any kernel object with ``rmatmul(x)``, such as :class:`sparsejax.lora.LoraWeight`)."""

    def __init__(self, din: int, dout: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (din, dout), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        # A kernel object that applies itself (sparsejax.lora.LoraWeight: x @ W + LoRA).
        y = ops.matmul(x, kernel)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """RMSNorm with statistics in float32; output cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_cos_sin(config: DecoderConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[B, T, head_dim]`` (float32) for integer ``positions [B, T]``."""
    inv_freq = jnp.asarray(config.inv_frequencies())
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, heads, D]`` by position (the half-split layout HF uses)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def _xla_attention(q, k, v, mask):
    """Grouped-query attention in plain XLA ops, softmax in float32.

    ``q [B, T, H, D]``, ``k, v [B, S, K, D]``, ``mask [B, T, S]`` bool.
    """
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype).reshape(b, t, h, d)


def _cudnn_applies(config: DecoderConfig, q: jax.Array) -> bool:
    """Whether ``attention_impl="auto"`` should use cuDNN's fused attention here."""
    if config.attention_impl == "xla":
        return False
    if config.attention_impl == "cudnn":
        return True
    return (jax.default_backend() == "gpu"
            and q.dtype in (jnp.bfloat16, jnp.float16)
            and config.head_dim % 8 == 0 and config.head_dim <= 128
            and q.shape[1] > 1)


def attention(config: DecoderConfig, q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array) -> jax.Array:
    """Masked grouped-query attention ``[B, T, H, D]``; cuDNN where it applies, else XLA.

    On the XLA path, more than ``attention_chunk_size**2`` query-key pairs run in
    blocks (:func:`~sparsejax.models.attention.chunked_attention`: no ``T x S``
    scores, forward or backward); smaller problems, such as a decode step's single
    query, use one full-score einsum.

    With ``attention_impl="auto"`` a cuDNN failure at trace time falls back to XLA
    with a warning; ``"cudnn"`` raises instead.
    """
    if _cudnn_applies(config, q):
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                                implementation="cudnn")
        except Exception as e:
            if config.attention_impl == "cudnn":
                raise
            warnings.warn(f"cuDNN attention unavailable ({e}); using XLA attention", stacklevel=2)
    chunk = config.attention_chunk_size
    if chunk and q.shape[1] * k.shape[1] > chunk * chunk:
        return chunked_attention(q, k, v, mask, chunk_q=chunk, chunk_k=chunk)
    return _xla_attention(q, k, v, mask)


class Attention(nnx.Module):
    """Self-attention with RoPE, GQA, optional per-head q/k RMSNorm (Qwen3) and an
    optional KV cache (the q/k norms apply before RoPE and before the cache write, so
    the cache holds normalized, rotated keys on every path)."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        c, dt = config, config.dtype
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.config = config
        self.q_proj = Dense(c.hidden_size, q_dim, use_bias=c.qkv_bias, dtype=dt, rngs=rngs)
        self.k_proj = Dense(c.hidden_size, kv_dim, use_bias=c.qkv_bias, dtype=dt, rngs=rngs)
        self.v_proj = Dense(c.hidden_size, kv_dim, use_bias=c.qkv_bias, dtype=dt, rngs=rngs)
        self.o_proj = Dense(q_dim, c.hidden_size, use_bias=c.o_bias, dtype=dt, rngs=rngs)
        if c.qk_norm:  # absent otherwise: a Llama / Qwen2 graph is unchanged
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)

    def __call__(self, x, cos, sin, mask, cache: LayerCache | None, cache_index):
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        q = apply_rope(self.q_norm(q) if c.qk_norm else q, cos, sin)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        k = apply_rope(self.k_norm(k) if c.qk_norm else k, cos, sin)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if cache is not None and hasattr(cache, "attend"):
            # A cache that stores and attends by itself (sparsejax.generation.slot_attention.SlotCache).
            out, cache = cache.attend(q, k, v)
            return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), cache
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start)
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start)
            cache = LayerCache(k, v)
            # Attend to the slots the mask covers: a prefill at a static index 0 builds
            # a [B, T, T] mask and so skips the cache's empty tail.
            k, v = k[:, :mask.shape[-1]], v[:, :mask.shape[-1]]
        out = attention(c, q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        c, dt = config, config.dtype
        self.gate_proj = Dense(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias,
                               dtype=dt, rngs=rngs)
        self.up_proj = Dense(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias,
                             dtype=dt, rngs=rngs)
        self.down_proj = Dense(c.intermediate_size, c.hidden_size, use_bias=c.mlp_bias,
                               dtype=dt, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """One pre-norm transformer layer (layer ``index``: a MoE layer or a dense one)."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs, index: int = 0):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.attn = Attention(config, rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.mlp = MoE(config, rngs) if config.is_moe_layer(index) else MLP(config, rngs)

    def __call__(self, x, cos, sin, mask, cache, cache_index):
        a, cache = self.attn(self.input_norm(x), cos, sin, mask, cache, cache_index)
        x = x + a
        return x + self.mlp(self.post_attn_norm(x)), cache

    def with_router_logits(self, x, cos, sin, mask):
        """``(output, router_logits)`` without a cache; the logits ``[tokens, E]`` of a MoE
        layer's router, None for a dense layer."""
        x = x + self.attn(self.input_norm(x), cos, sin, mask, None, 0)[0]
        if not isinstance(self.mlp, MoE):
            return x + self.mlp(self.post_attn_norm(x)), None
        y, logits = self.mlp.with_router_logits(self.post_attn_norm(x))
        return x + y, logits


_REMAT_POLICIES = {
    "layer": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat_layer(layer: Block, remat: str, x, cos, sin, mask, router_logits: bool = False):
    """``layer(x)`` (no cache) whose backward pass recomputes the layer's activations
    (with ``router_logits``: ``layer.with_router_logits(x)``, a pair).

    The forward pass keeps only what ``jax.checkpoint``'s policy ``remat`` saves (for
    ``"layer"``: the layer's inputs). The backward pass ties those residuals to the
    incoming cotangent with an optimization barrier before recomputing, so XLA cannot
    hoist the recomputation of every layer to the start of the backward pass (which
    would hold all layers' activations at once, as no remat does), and finishes the
    layer's whole backward (weight gradients included) before the next one.

    XLA's GPU and TPU pipelines keep optimization barriers until after CSE; its CPU
    pipeline removes them first (pass ``cse_barrier_expander``), so on CPU the
    recomputation is merged back into the forward pass and saves nothing unless
    that pass is disabled (``experiments/memory_plan.py`` does so).
    """
    graphdef, state = nnx.split(layer)

    def run(state, x, cos, sin, mask):
        block = nnx.merge(graphdef, state)
        if router_logits:
            return block.with_router_logits(x, cos, sin, mask)
        return block(x, cos, sin, mask, None, 0)[0]

    @jax.custom_vjp
    def call(state, x, cos, sin, mask):
        return run(state, x, cos, sin, mask)

    def call_fwd(state, x, cos, sin, mask):
        if remat == "layer":
            return run(state, x, cos, sin, mask), (state, x, cos, sin, mask)
        return jax.vjp(jax.checkpoint(run, policy=_REMAT_POLICIES[remat]),
                       state, x, cos, sin, mask)

    def call_bwd(res, g):
        res, g = jax.lax.optimization_barrier((res, g))
        vjp_fn = jax.vjp(run, *res)[1] if remat == "layer" else res
        # One barrier over all of this layer's cotangents: the next layer's backward
        # (which needs d_x) cannot start before this layer's weight gradients exist, so
        # XLA cannot defer them and keep every layer's activations alive meanwhile.
        return jax.lax.optimization_barrier(vjp_fn(g))

    call.defvjp(call_fwd, call_bwd)
    return call(state, x, cos, sin, mask)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids ``cumsum(mask) - 1`` (pads get 0); ``[B, T]`` int32."""
    m = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """``[B, T, T]`` bool: query i sees key j iff ``j <= i`` and j is real (or ``j == i``)."""
    t = attention_mask.shape[-1]
    idx = jnp.arange(t)
    causal = idx[None, :] <= idx[:, None]
    visible = causal[None] & attention_mask.astype(bool)[:, None, :]
    return visible | jnp.eye(t, dtype=bool)[None]


def cached_mask(kv_valid: jax.Array, cache_index, num_new: int) -> jax.Array:
    """``[B, T, S]`` bool for ``num_new`` queries written at ``cache_index`` of an S-slot cache.

    ``kv_valid [B, S]`` marks the real (non-pad, already written) slots, including the
    new ones.
    """
    s = kv_valid.shape[-1]
    q_idx = cache_index + jnp.arange(num_new)
    k_idx = jnp.arange(s)
    causal = k_idx[None, :] <= q_idx[:, None]
    visible = causal[None] & kv_valid.astype(bool)[:, None, :]
    return visible | (k_idx[None, :] == q_idx[:, None])[None]


class Decoder(nnx.Module):
    """A Llama 3.x / Qwen2 / Qwen3 / Qwen3-MoE causal language model.

    ``Decoder(config, rngs=nnx.Rngs(0))`` builds random weights (normal, std 0.02;
    norms 1; biases 0); :func:`sparsejax.models.load_hf` fills them from a checkpoint.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt = config.dtype
        self.embed = nnx.Param(_normal(rngs, (config.vocab_size, config.hidden_size), dt))
        self.layers = nnx.List([Block(config, rngs, i) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.lm_head = (None if config.tie_word_embeddings else
                        nnx.Param(_normal(rngs, (config.hidden_size, config.vocab_size), dt)))

    def hidden(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: tuple[LayerCache, ...] | None = None, cache_index=0
               ) -> tuple[jax.Array, tuple[LayerCache, ...] | None]:
        """Final-normed hidden states ``[B, T, hidden]`` and the updated cache.

        Args:
            tokens: ``[B, T]`` int token ids.
            positions: ``[B, T]`` int RoPE positions.
            mask: ``[B, T, S]`` bool attention mask over the first S key slots (S = T
                without a cache; with one, S <= the cache length and the keys past S are
                ignored); see :func:`causal_padding_mask`, :func:`cached_mask`.
            cache: per-layer :class:`LayerCache`, or None for a plain forward pass.
            cache_index: slot where this call's keys/values are written.
        """
        x = ops.take_rows(self.embed[...], tokens)
        cos, sin = rope_cos_sin(self.config, positions)
        new_cache = []
        for i, layer in enumerate(self.layers):
            if cache is None and self.config.remat != "none":
                x = _remat_layer(layer, self.config.remat, x, cos, sin, mask)
                c = None
            else:
                x, c = layer(x, cos, sin, mask, None if cache is None else cache[i],
                             cache_index)
            new_cache.append(c)
        return self.final_norm(x), (None if cache is None else tuple(new_cache))

    def hidden_and_router_logits(self, tokens: jax.Array, positions: jax.Array,
                                 mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Final-normed hidden states (as :meth:`hidden` without a cache) and the router
        logits ``[B * T, E]`` of each MoE layer, in layer order (empty for a dense model);
        differentiable, for :func:`sparsejax.models.moe.load_balancing_loss`."""
        x = ops.take_rows(self.embed[...], tokens)
        cos, sin = rope_cos_sin(self.config, positions)
        routers = []
        for layer in self.layers:
            if self.config.remat != "none":
                x, logits = _remat_layer(layer, self.config.remat, x, cos, sin, mask,
                                         router_logits=True)
            else:
                x, logits = layer.with_router_logits(x, cos, sin, mask)
            if logits is not None:
                routers.append(logits)
        return self.final_norm(x), tuple(routers)

    def output_matrix(self) -> jax.Array:
        """The ``[hidden, vocab]`` output projection (the embedding's
        :func:`~sparsejax.models.ops.transpose` view when tied: no transpose op)."""
        return (ops.transpose(self.embed[...]) if self.lm_head is None
                else self.lm_head[...])

    def logits(self, h: jax.Array) -> jax.Array:
        """float32 logits of hidden states ``h [..., hidden]``."""
        return ops.matmul(h, self.output_matrix(), preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        """float32 logits ``[B, T, vocab]`` of a left-padded batch."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        h, _ = self.hidden(tokens, positions_from_mask(attention_mask),
                           causal_padding_mask(attention_mask))
        return self.logits(h)


def init_model(config: DecoderConfig, seed: int = 0) -> Decoder:
    """A :class:`Decoder` with random weights, built in one jitted call."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(seed))))

    @jax.jit
    def make():
        return nnx.split(Decoder(config, rngs=nnx.Rngs(seed)))[1]

    return nnx.merge(graphdef, make())


def reconfigure(graphdef: nnx.GraphDef, params: nnx.State, **changes) -> nnx.GraphDef:
    """The graphdef of the same decoder with config fields changed (e.g. ``remat``).

    Only fields that leave the params' shapes and dtypes alone make sense here
    (``remat``, ``attention_impl``, ``attention_chunk_size``): the returned graphdef
    merges with the same ``params`` pytree. Nothing is allocated.
    """
    current = nnx.merge(graphdef, params).config
    config = current.replace(**changes)
    if config == current:
        return graphdef
    new, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    if jax.tree.structure(abstract) != jax.tree.structure(params):
        raise ValueError(f"config changes {sorted(changes)} change the params' structure")
    return new


def apply(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
          attention_mask: jax.Array | None = None) -> jax.Array:
    """Pure forward pass: float32 logits ``[B, T, vocab]``; differentiable in ``params``.

    ``graphdef, params = nnx.split(model)``.
    """
    return nnx.merge(graphdef, params)(tokens, attention_mask)


def apply_with_router_logits(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
                             attention_mask: jax.Array | None = None
                             ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """:func:`apply` that also returns each MoE layer's router logits ``[B * T, E]``
    (transformers' ``output_router_logits=True``); the load-balancing loss is
    ``moe.load_balancing_loss(router_logits, config.num_experts_per_tok, attention_mask)``."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    model = nnx.merge(graphdef, params)
    h, routers = model.hidden_and_router_logits(
        tokens, positions_from_mask(attention_mask), causal_padding_mask(attention_mask))
    return model.logits(h), routers


def hidden_states(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
                  attention_mask: jax.Array | None = None) -> jax.Array:
    """Pure forward pass up to the final norm: ``[B, T, hidden]`` in the param dtype."""
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden(tokens, positions_from_mask(attention_mask),
                        causal_padding_mask(attention_mask))
    return h
