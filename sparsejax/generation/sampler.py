"""Batched sampling from the decoder with a KV cache: prefill, then a jitted decode loop.

The sampler is the first stage of a GRPO iteration: left-padded prompts in, completions,
their per-token log-probs and completion masks out.

How it works: prompts are left padded to a bucketed length ``P`` (powers of two up to
64, then multiples of 64: :func:`bucket_length`), so every prompt's last token sits in
slot ``P - 1`` and the whole batch writes its next key/value to the same cache slot.
One prefill pass fills slots ``[0, P)``; a ``lax.while_loop`` then samples a token,
records it and feeds it back (slot ``P + t`` at step ``t``) until ``max_new_tokens`` or
every sequence has emitted a stop token. Positions come from the attention mask, so
padding changes nothing for the real tokens.

Guarantees:
    * the same inputs and PRNG key give the same tokens (the key of step ``t`` is
      ``fold_in(key, t)``);
    * ``temperature=0`` is greedy decoding (argmax, ties to the lowest id);
    * ``logprobs[b, t]`` is ``log softmax(logits / T)[token]`` of the full distribution
      (before top-k/top-p truncation), with ``T = temperature`` (1 when greedy), i.e.
      what :func:`sparsejax.models.logprobs.completion_logprobs` computes at the same
      temperature;
    * ``mask[b, t]`` is 1 for every generated token up to and including the first stop
      token; later tokens are ``pad_id`` with mask 0 and log-prob 0;
    * prompts whose bucketed length is the same reuse one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.models.config import DecoderConfig
from sparsejax.models.decoder import LayerCache, cached_mask, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens (hashable: a static argument of the compiled loop).

    Attributes:
        max_new_tokens: completion length budget.
        temperature: 0 for greedy decoding, else logits are divided by it.
        top_k: keep only the k most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches
            ``top_p`` (1.0: all).
        stop_token_ids: a sequence ends after emitting any of these (e.g. EOS ids).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


class KVCache(NamedTuple):
    """Decoding state: per-layer keys/values and what has been written.

    ``layers``: one :class:`LayerCache` per layer, ``[B, S, kv_heads, head_dim]``;
    ``valid [B, S]``: slots holding real tokens; ``index``: the next slot to write
    (shared by the batch); ``next_pos [B]``: the RoPE position of each row's next token.
    """

    layers: tuple[LayerCache, ...]
    valid: jax.Array
    index: jax.Array
    next_pos: jax.Array


class SampleOutput(NamedTuple):
    """Result of :func:`generate`: ``B`` prompts, ``N = max_new_tokens``.

    ``prompt_tokens, prompt_mask [B, P]`` (left padded to the bucket), ``tokens [B, N]``
    int32, ``logprobs [B, N]`` float32, ``mask [B, N]`` int32 completion mask,
    ``lengths [B]`` number of generated tokens (stop token included).
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array


def bucket_length(n: int, multiple: int = 64, minimum: int = 8) -> int:
    """The padded length for an ``n``-token prompt: a power of two up to ``multiple``,
    then the next multiple of ``multiple``. Never less than ``n`` or ``minimum``."""
    n = max(int(n), minimum)
    if n <= multiple:
        return 1 << (n - 1).bit_length()
    return -(-n // multiple) * multiple


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)`` int32 ``[B, L]`` with each sequence right-aligned (left padding).

    ``length`` defaults to :func:`bucket_length` of the longest sequence.
    """
    longest = max((len(s) for s in sequences), default=1)
    length = bucket_length(longest) if length is None else length
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest sequence ({longest})")
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        if len(s):
            tokens[i, length - len(s):] = np.asarray(s, np.int32)
            mask[i, length - len(s):] = 1
    return tokens, mask


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id."""
    pad = tokenizer.pad_token_id
    return int(tokenizer.eos_token_id if pad is None else pad)


def encode_prompts(tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool = True,
                   length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes plain-text prompts and left pads them (bucketed unless ``length``)."""
    ids = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    return left_pad(ids, pad_token_id(tokenizer), length)


def encode_chat(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]] | str], *,
                add_generation_prompt: bool = True, length: int | None = None,
                **template_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Encodes a batch of chats with the tokenizer's chat template, left padded.

    Args:
        tokenizer: a transformers tokenizer with a chat template (``AutoTokenizer``).
        conversations: each a list of ``{"role", "content"}`` messages, or a string
            taken as one user message.
        add_generation_prompt: end with the assistant turn header.
        length: pad to this length (default :func:`bucket_length` of the longest).
        template_kwargs: passed to ``apply_chat_template`` (e.g. ``tools``).

    Returns:
        ``(tokens, mask)`` int32 ``[B, L]``. The template supplies any BOS token, so no
        special tokens are added on top of it.
    """
    ids = []
    for conv in conversations:
        messages = [{"role": "user", "content": conv}] if isinstance(conv, str) else conv
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
            **template_kwargs)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return left_pad(ids, pad_token_id(tokenizer), length)


def decode_completions(tokenizer: Any, out: SampleOutput, *,
                       skip_special_tokens: bool = True) -> list[str]:
    """The generated texts of a :class:`SampleOutput` (masked tokens dropped)."""
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask).astype(bool)
    return [tokenizer.decode(t[m].tolist(), skip_special_tokens=skip_special_tokens)
            for t, m in zip(tokens, mask)]


def init_cache(config: DecoderConfig, batch: int, length: int, dtype=None) -> KVCache:
    """An empty :class:`KVCache` with ``length`` slots (keys/values in ``dtype``)."""
    dtype = config.dtype if dtype is None else dtype
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    layers = tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                   for _ in range(config.num_layers))
    return KVCache(layers, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32),
                   jnp.zeros((batch,), jnp.int32))


def prefill(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array, mask: jax.Array,
            cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs the left-padded prompts ``[B, P]`` into slots ``[0, P)`` of an empty cache.

    Returns the float32 logits ``[B, vocab]`` of each row's next token and the cache.
    """
    model = nnx.merge(graphdef, params)
    p = tokens.shape[1]
    valid = cache.valid.at[:, :p].set(mask.astype(bool))
    attn_mask = cached_mask(valid[:, :p], 0, p)
    h, layers = model.hidden(tokens, positions_from_mask(mask), attn_mask, cache.layers, 0)
    logits = model.logits(h[:, -1])
    next_pos = jnp.sum(mask.astype(jnp.int32), axis=1)
    return logits, KVCache(layers, valid, jnp.asarray(p, jnp.int32), next_pos)


def decode_step(graphdef: nnx.GraphDef, params: nnx.State, token: jax.Array,
                cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feeds one token per row ``[B]``; returns next-token logits ``[B, vocab]`` and the cache."""
    model = nnx.merge(graphdef, params)
    valid = cache.valid.at[:, cache.index].set(True)
    attn_mask = cached_mask(valid, cache.index, 1)
    h, layers = model.hidden(token[:, None], cache.next_pos[:, None], attn_mask,
                             cache.layers, cache.index)
    return model.logits(h[:, 0]), KVCache(layers, valid, cache.index + 1, cache.next_pos + 1)


def filter_logits(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
    """Temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    z = logits / sampling.temperature
    neg_inf = jnp.asarray(-jnp.inf, z.dtype)
    if sampling.top_k > 0 and sampling.top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, sampling.top_k)[0][..., -1:]
        z = jnp.where(z < kth, neg_inf, z)
    if sampling.top_p < 1.0:
        sorted_z = -jnp.sort(-z, axis=-1)
        probs = jax.nn.softmax(sorted_z, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_z, keep - 1, axis=-1)
        z = jnp.where(z < threshold, neg_inf, z)
    return z


def sample_token(logits: jax.Array, key: jax.Array, sampling: SamplingParams
                 ) -> tuple[jax.Array, jax.Array]:
    """``(token [B] int32, logprob [B] float32)`` drawn from ``logits [B, vocab]``."""
    if sampling.temperature == 0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits
    else:
        token = jax.random.categorical(key, filter_logits(logits, sampling)).astype(jnp.int32)
        scaled = logits / sampling.temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "pad_id"))
def generate_program(graphdef, params, prompt_tokens, prompt_mask, key, *, sampling, pad_id):
    """The compiled program behind :func:`generate` (left-padded prompts in, device arrays
    out: ``(tokens, logps, mask)``); planners and benchmarks lower it on their shapes."""
    config: DecoderConfig = nnx.merge(graphdef, params).config
    b, p = prompt_tokens.shape
    n = sampling.max_new_tokens
    cache = init_cache(config, b, p + n)
    logits, cache = prefill(graphdef, params, prompt_tokens, prompt_mask, cache)
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)

    def cond(carry):
        t, _, _, _, _, _, done = carry
        return (t < n) & ~jnp.all(done)

    def body(carry):
        t, cache, logits, tokens, logps, mask, done = carry
        token, logp = sample_token(logits, jax.random.fold_in(key, t), sampling)
        active = ~done
        token = jnp.where(active, token, pad_id)
        tokens = tokens.at[:, t].set(token)
        logps = logps.at[:, t].set(jnp.where(active, logp, 0.0))
        mask = mask.at[:, t].set(active.astype(jnp.int32))
        done = done | jnp.isin(token, stop_ids)
        logits, cache = decode_step(graphdef, params, token, cache)
        return t + 1, cache, logits, tokens, logps, mask, done

    carry = (jnp.zeros((), jnp.int32), cache, logits,
             jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
             jnp.zeros((b, n), jnp.int32), jnp.zeros((b,), bool))
    _, _, _, tokens, logps, mask, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, logps, mask


def generate(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: Any,
             prompt_mask: Any, key: jax.Array, sampling: SamplingParams = SamplingParams(),
             *, pad_id: int = 0, bucket: bool = True) -> SampleOutput:
    """Samples completions for a batch of left-padded prompts.

    Args:
        graphdef, params: ``nnx.split(model)`` of a :class:`~sparsejax.models.Decoder`.
        prompt_tokens, prompt_mask: ``[B, P]`` left-padded prompts (e.g. from
            :func:`encode_chat`); host arrays preferred (they are re-bucketed on host).
        key: PRNG key; the result is a deterministic function of it.
        sampling: :class:`SamplingParams` (a static argument: changing it recompiles).
        pad_id: token written after a sequence has stopped.
        bucket: re-pad the prompts to :func:`bucket_length` of their longest real
            prompt so that steady-state generation does not recompile.

    Returns:
        :class:`SampleOutput`.
    """
    tokens = np.asarray(jax.device_get(prompt_tokens)).astype(np.int32)
    mask = np.asarray(jax.device_get(prompt_mask)).astype(np.int32)
    if bucket:
        longest = int(mask.sum(axis=1).max(initial=1))
        target = bucket_length(longest)
        width = tokens.shape[1]
        if width > target:
            tokens, mask = tokens[:, width - target:], mask[:, width - target:]
        elif width < target:
            extra = target - width
            tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id)
            mask = np.pad(mask, ((0, 0), (extra, 0)))
    out_tokens, logps, out_mask = generate_program(graphdef, params, tokens, mask, key,
                                            sampling=sampling, pad_id=int(pad_id))
    return SampleOutput(jnp.asarray(tokens), jnp.asarray(mask), out_tokens, logps, out_mask,
                        jnp.sum(out_mask, axis=1))
