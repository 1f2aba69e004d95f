"""Log-probabilities (and entropies) of given tokens under the decoder, chunked over tokens.

The RL losses need ``log p(token | prefix)`` of every completion token at the sampling
temperature, for the policy and a reference model, with gradients. Materialising the
``[batch, length, vocab]`` float32 logits at once does not fit for Qwen's 151,936-token
vocabulary (64 x 1024 x 151,936 x 4 bytes = 40 GB), so the hidden states are computed
once and then projected to the vocabulary ``chunk_size`` tokens at a time
(``lax.map``), each chunk rematerialised in the backward pass (``jax.checkpoint``):
peak logits memory is ``chunk_size x vocab`` floats, forward and backward.

Math, with ``z = logits / temperature``: ``logp = z[target] - logsumexp(z)`` and the
entropy of the same distribution ``H = logsumexp(z) - sum(softmax(z) * z)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models import ops
from sparsejax.models.decoder import causal_padding_mask, positions_from_mask


def logprobs_from_hidden(h: jax.Array, w_out: jax.Array, targets: jax.Array, *,
                         temperature: float = 1.0, chunk_size: int = 1024,
                         return_entropy: bool = False
                         ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Log-probs of ``targets`` from hidden states, ``chunk_size`` tokens at a time.

    Args:
        h: ``[..., hidden]`` final-normed hidden states.
        w_out: ``[hidden, vocab]`` output projection.
        targets: ``[...]`` int token ids (the leading shape of ``h``).
        temperature: logits are divided by it (> 0).
        chunk_size: tokens projected at once; bounds the float32 logits held to
            ``chunk_size x vocab``.
        return_entropy: also return the entropy of each position's distribution.

    Returns:
        float32 ``logp`` shaped like ``targets`` (and ``entropy`` when asked).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead = targets.shape
    n = int(targets.size)
    flat_h = h.reshape(n, h.shape[-1])
    flat_t = targets.reshape(n).astype(jnp.int32)
    chunk = max(1, min(chunk_size, n))
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
    flat_t = jnp.pad(flat_t, (0, pad))

    @jax.checkpoint
    def one_chunk(args):
        hc, tc = args
        z = ops.matmul(hc, w_out, preferred_element_type=jnp.float32) / temperature
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, tc[:, None], axis=-1)[:, 0] - lse
        entropy = lse - jnp.sum(jax.nn.softmax(z, axis=-1) * z, axis=-1)
        return logp, entropy

    logp, entropy = jax.lax.map(
        one_chunk, (flat_h.reshape(num_chunks, chunk, -1), flat_t.reshape(num_chunks, chunk)))
    logp = logp.reshape(-1)[:n].reshape(lead)
    if not return_entropy:
        return logp
    return logp, entropy.reshape(-1)[:n].reshape(lead)


def completion_logprobs(graphdef: nnx.GraphDef, params: nnx.State,
                        prompt_tokens: jax.Array, prompt_mask: jax.Array,
                        completion_tokens: jax.Array, completion_mask: jax.Array, *,
                        temperature: float = 1.0, chunk_size: int = 1024,
                        return_entropy: bool = False
                        ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Log-probs ``[B, C]`` of completion tokens given left-padded prompts.

    The sequence is ``prompt_tokens [B, P]`` (left padded) followed by
    ``completion_tokens [B, C]`` (right padded); the distribution of completion token
    ``j`` is read at position ``P - 1 + j``. Only those ``C`` positions are projected to
    the vocabulary. Positions where ``completion_mask`` is 0 are returned as 0 (and
    entropy 0). Differentiable in ``params``.
    """
    tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.int32)
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden(tokens, positions_from_mask(mask), causal_padding_mask(mask))
    p, c = prompt_tokens.shape[1], completion_tokens.shape[1]
    h = h[:, p - 1:p - 1 + c]
    out = logprobs_from_hidden(h, model.output_matrix(), completion_tokens,
                               temperature=temperature, chunk_size=chunk_size,
                               return_entropy=return_entropy)
    valid = completion_mask.astype(bool)
    if return_entropy:
        return jnp.where(valid, out[0], 0.0), jnp.where(valid, out[1], 0.0)
    return jnp.where(valid, out, 0.0)


def token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
                   attention_mask: jax.Array | None = None, *, temperature: float = 1.0,
                   chunk_size: int = 1024, return_entropy: bool = False
                   ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Log-probs ``[B, T-1]`` of ``tokens[:, 1:]`` given their prefixes (chunked).

    Entry ``[b, t]`` is ``log p(tokens[b, t+1] | tokens[b, :t+1])``; it is meaningless
    (but finite) where ``tokens[b, t+1]`` is padding.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, jnp.int32)
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden(tokens, positions_from_mask(attention_mask),
                        causal_padding_mask(attention_mask))
    return logprobs_from_hidden(h[:, :-1], model.output_matrix(), tokens[:, 1:],
                                temperature=temperature, chunk_size=chunk_size,
                                return_entropy=return_entropy)
