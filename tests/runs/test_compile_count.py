"""``compile_count`` counts the XLA programs built: a new shape builds one, a seen one
does not."""

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.runs.reporting import compile_count, compile_seconds


def test_compile_count_counts_new_programs_only():
    rng = np.random.default_rng()
    scale = float(rng.uniform(1, 2))  # a fresh constant: never in the persistent cache
    f = jax.jit(lambda x: jnp.tanh(x * scale) @ x.T)
    before, seconds = compile_count(), compile_seconds()
    jax.block_until_ready(f(jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)))
    first = compile_count()
    assert first >= before + 1 and compile_seconds() > seconds
    jax.block_until_ready(f(jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)))
    assert compile_count() == first  # same shape: the compiled program is reused
    jax.block_until_ready(f(jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)))
    assert compile_count() >= first + 1
