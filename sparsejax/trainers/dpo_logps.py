"""Per-token completion log-probs of DPO pairs (and WPO's statistic), one forward pass.

The chosen and rejected completions of a micro-batch run as one batch of ``2B``
sequences behind their (shared) prompts. WPO (``use_weighting``) also needs, per
completion token, ``log sum_v p(v)^2`` of the policy's distribution there: it reads the
same hidden states, projected to the vocabulary chunk by chunk again (no gradient flows
through it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.models import ops
from sparsejax.models.decoder import causal_padding_mask, positions_from_mask
from sparsejax.models.logprobs import completion_logprobs, logprobs_from_hidden
from sparsejax.types import PyTree


def log_sum_sq_probs_from_hidden(h: jax.Array, w_out: jax.Array, *, chunk_size: int = 1024
                                 ) -> jax.Array:
    """``log sum_v p(v)^2 = logsumexp(2 z) - 2 logsumexp(z)`` per position of ``h [..., hidden]``
    (``z`` the logits), ``chunk_size`` positions at a time; a constant (no gradient)."""
    lead = h.shape[:-1]
    n = math.prod(lead)
    flat = jax.lax.stop_gradient(h.reshape(n, h.shape[-1]))
    chunk = max(1, min(chunk_size, n))
    num_chunks = -(-n // chunk)
    flat = jnp.pad(flat, ((0, num_chunks * chunk - n), (0, 0)))

    def one_chunk(hc):
        z = ops.matmul(hc, w_out, preferred_element_type=jnp.float32)
        return jax.nn.logsumexp(2.0 * z, axis=-1) - 2.0 * jax.nn.logsumexp(z, axis=-1)

    out = jax.lax.map(one_chunk, flat.reshape(num_chunks, chunk, -1))
    return jax.lax.stop_gradient(out.reshape(-1)[:n].reshape(lead))


def pair_token_logps(graphdef: nnx.GraphDef, params: PyTree, batch: Mapping[str, jax.Array], *,
                     chunk_size: int = 1024, with_sq: bool = False) -> dict[str, jax.Array]:
    """``{"chosen", "rejected"}`` per-token completion log-probs ``[B, C]`` (0 off the
    masks) of a batch of pairs; with ``with_sq`` also ``"chosen_sq"``, ``"rejected_sq"``,
    the per-token ``log sum_v p(v)^2`` (0 off the masks)."""
    prompt = jnp.concatenate([batch["prompt_tokens"]] * 2, axis=0)
    prompt_mask = jnp.concatenate([batch["prompt_mask"]] * 2, axis=0)
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    n = batch["prompt_tokens"].shape[0]
    if not with_sq:
        logps = completion_logprobs(graphdef, params, prompt, prompt_mask, tokens, mask,
                                    chunk_size=chunk_size)
        return {"chosen": logps[:n], "rejected": logps[n:]}
    # completion_logprobs' steps, keeping the hidden states for the second statistic.
    full = jnp.concatenate([prompt, tokens], axis=1)
    full_mask = jnp.concatenate([prompt_mask, mask], axis=1).astype(jnp.int32)
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden(full, positions_from_mask(full_mask), causal_padding_mask(full_mask))
    p, c = prompt.shape[1], tokens.shape[1]
    h = h[:, p - 1:p - 1 + c]
    w_out = model.output_matrix()
    valid = mask.astype(bool)
    logps = jnp.where(valid, logprobs_from_hidden(h, w_out, tokens, chunk_size=chunk_size), 0.0)
    sq = jnp.where(valid, log_sum_sq_probs_from_hidden(h, w_out, chunk_size=chunk_size), 0.0)
    return {"chosen": logps[:n], "rejected": logps[n:], "chosen_sq": sq[:n], "rejected_sq": sq[n:]}
