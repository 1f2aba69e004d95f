"""Reference computations several test files compare against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def hf_greedy(hf, tokens: np.ndarray, mask: np.ndarray, n: int, eos) -> np.ndarray:
    """transformers' greedy ``generate`` of ``n`` tokens after left-padded ``tokens``,
    padded with 0 to ``n`` columns (transformers stops once every row is done)."""
    import torch
    hf.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          do_sample=False, max_new_tokens=n, pad_token_id=0)
    out = out[:, tokens.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, n - out.shape[1])))


def cached_logits(sampling, config, graphdef, params, tokens: np.ndarray, mask: np.ndarray,
                  cont: np.ndarray, cache_len: int):
    """``([B, steps + 1, V] logits, cache)`` of the KV-cache path: a prefill of the
    left-padded ``tokens``, then one decode step per column of ``cont`` (``sampling`` is
    :mod:`sparsejax.generation.sampler`)."""
    cache = sampling.init_cache(config, tokens.shape[0], cache_len)
    logits, cache = jax.jit(sampling.prefill, static_argnums=0)(
        graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), cache)
    step = jax.jit(sampling.decode_step, static_argnums=0)
    got = [np.asarray(logits)]
    for t in range(cont.shape[1]):
        logits, cache = step(graphdef, params, jnp.asarray(cont[:, t], jnp.int32), cache)
        got.append(np.asarray(logits))
    return np.stack(got, axis=1), cache
