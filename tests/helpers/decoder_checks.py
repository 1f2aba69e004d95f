"""Checks every decoder family shares against transformers: left-padded batches, the jitted
forward, KV-cache decoding against the full forward, greedy generation (batch sampler and
slot sampler) against transformers' ``generate``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.generation import rollouts
from sparsejax.generation import sampler as sampling
from sparsejax.models import apply

from references import cached_logits, hf_greedy

ATOL = 1e-4


def left_padded_batch(rng, vocab: int, batch: int = 3, length: int = 20):
    """Random tokens with random left padding (row 0 unpadded)."""
    tokens = rng.integers(3, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        mask[b, :rng.integers(1, length // 2)] = 0
    return np.where(mask == 1, tokens, 0), mask


_jit_apply = jax.jit(apply, static_argnums=0)


def forward(graphdef, params, tokens, mask) -> np.ndarray:
    return np.asarray(_jit_apply(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask)))


def check_kv_cache_decode(model) -> None:
    """Logits decoded with the KV cache equal the full forward's."""
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(5)
    seqs = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (7, 4, 6)]
    tokens, mask = sampling.left_pad(seqs, pad_id=0)
    steps = 4
    cont = rng.integers(3, model.config.vocab_size, (tokens.shape[0], steps))
    full = forward(graphdef, params, np.concatenate([tokens, cont], 1),
                   np.concatenate([mask, np.ones_like(cont)], 1))
    p = tokens.shape[1]
    got, _ = cached_logits(sampling, model.config, graphdef, params, tokens, mask,
                           cont[:, :steps], p + steps + 2)
    np.testing.assert_allclose(got, full[:, p - 1:], atol=ATOL, rtol=0)


def check_greedy_matches_transformers(hf, model) -> None:
    """Greedy tokens of the batch sampler and the slot sampler equal transformers'
    ``generate`` (with a stop token one row meets early); their log-probs agree."""
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (7, 4, 6)]
    tokens, mask = sampling.left_pad(seqs, pad_id=0)
    n = 12
    free = hf_greedy(hf, tokens, mask, n, None)
    stop = int(free[0, 3])  # row 0 stops at step <= 3
    ref = hf_greedy(hf, tokens, mask, n, stop)
    assert len({tuple(r) for r in free}) > 1  # rows differ: not a constant output
    greedy = sampling.SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=(stop,))
    out = sampling.generate(graphdef, params, tokens, mask, jax.random.key(0), greedy)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert int(out.lengths[0]) < n
    slots = rollouts.rollout(graphdef, params, tokens, mask, jax.random.key(0), greedy,
                             num_samples=2, num_slots=2, chunk_size=8)
    np.testing.assert_array_equal(slots.tokens, np.repeat(ref, 2, axis=0))
    np.testing.assert_array_equal(slots.lengths, np.repeat(np.asarray(out.lengths), 2))
    np.testing.assert_allclose(slots.logprobs, np.repeat(np.asarray(out.logprobs), 2, 0),
                               atol=1e-5, rtol=0)
