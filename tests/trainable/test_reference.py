"""The base policy as each "what trains" variant keeps it (``sparsejax.trainable.reference``).

Through the trainables' ``base_policy`` on fresh random params: the sparse variant swaps the
base values in and back (the policy's trained values come back bit for bit, also when
scoring raises); full finetuning keeps a device copy, or a host copy taken at the first
change (scored as the params themselves until then); the LoRA variant scores with the
initial adapters.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax import lora
from sparsejax.config import TrainableConfig
from sparsejax.models.config import DecoderConfig
from sparsejax.models.decoder import init_model
from sparsejax.trainable import build_trainable
from sparsejax.trainable.lora import LoraAdapter
from sparsejax.trainable.reference import ParamsCopy, SwappedValues, scoring


def params_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
            "b": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}}


def trained(trainable, params, opt_state, seed=1):
    """One real step with random gradients: the policy moves away from the base."""
    rng = np.random.default_rng(seed)
    grads = trainable.compress(jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params), opt_state)
    params, opt_state, _ = trainable.apply(params, grads, opt_state)
    return params, opt_state


def bits(tree):
    return [np.asarray(x).view(np.uint32).copy() for x in jax.tree.leaves(tree)]


def same(t1, t2):
    return all(np.array_equal(a, b) for a, b in zip(bits(t1), bits(t2)))


def test_sparse_swaps_base_values_in_and_back():
    base = params_tree()
    up = build_trainable(TrainableConfig(sparsity=0.5, learning_rate=1e-1), base)
    params = up.policy_params(jax.tree.map(jnp.copy, base))
    state = up.init(params)
    policy = up.base_policy(params, state)
    assert isinstance(policy, SwappedValues)
    policy.before_change(params)
    params, state = trained(up, params, state)
    run = SimpleNamespace(params=params, opt_state=state)
    want_policy = jax.tree.map(np.asarray, params)
    assert not same(want_policy, base)
    with scoring(run, policy) as scored:
        assert same(scored, base)  # only the k trained entries differ, and they are swapped
    assert same(run.params, want_policy)
    with pytest.raises(RuntimeError), scoring(run, policy):
        raise RuntimeError("scoring failed")
    assert same(run.params, want_policy)  # restored after a failure too


@pytest.mark.parametrize("on_host", [False, True])
def test_full_finetuning_keeps_a_copy(on_host):
    base = params_tree(2)
    up = build_trainable(TrainableConfig(sparsity=0.0, learning_rate=1e-1), base)
    params = up.policy_params(jax.tree.map(jnp.copy, base))
    state = up.init(params)
    policy = up.base_policy(params, state, on_host=on_host)
    assert isinstance(policy, ParamsCopy)
    run = SimpleNamespace(params=params, opt_state=state)
    with scoring(run, policy) as scored:  # untouched: the params are the base
        assert same(scored, base)
    policy.before_change(run.params)
    run.params, run.opt_state = trained(up, run.params, run.opt_state)
    policy.before_change(run.params)  # a second call keeps the first copy
    want_policy = jax.tree.map(np.asarray, run.params)
    assert not same(want_policy, base)
    with scoring(run, policy) as scored:
        assert same(scored, base)
    assert same(run.params, want_policy)


def test_lora_scores_with_the_initial_adapters():
    config = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=8, remat="none")
    _, base = nnx.split(init_model(config, seed=4))
    lcfg = lora.LoraConfig(rank=2, alpha=4)
    adapters = lora.init_adapters(base, lcfg, seed=5)
    up = LoraAdapter(TrainableConfig(learning_rate=1e-1, max_grad_norm=None), base, lcfg,
                          adapters=adapters)
    params = up.policy_params(base)
    state = up.init(params)
    policy = up.base_policy(params, state)
    start = jax.tree.map(np.asarray, up.active_values(params, state))
    rng = np.random.default_rng(6)
    grads = up.compress(jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), adapters), state)
    params, state, _ = up.apply(params, grads, state)
    run = SimpleNamespace(params=params, opt_state=state)
    moved = jax.tree.map(np.asarray, up.active_values(run.params, state))
    assert not same(moved, start)
    with scoring(run, policy) as scored:
        assert same(up.active_values(scored, state), start)
    assert same(up.active_values(run.params, state), moved)
