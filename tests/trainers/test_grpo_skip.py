"""Skipping micro-batches whose advantages are all zero leaves the gradient and the
trained params unchanged bit for bit (GRPOConfig.skip_zero_advantage)."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_grpo_trainer import TOKENIZER, tiny_config
from transformers import AutoTokenizer

from sparsejax.models.decoder import init_model
from sparsejax.trainers import GRPOConfig, GRPOTrainer, TrainableConfig

PROMPTS = ("1+1=", "two plus three", "4*2?", "seven", "9-3", "half of ten")
# Prompts whose answer is "flat" get the same reward for every sample: their groups have
# zero advantage. The others get a reward with spread on a random model.
ANSWERS = ("flat", "2", "flat", "5", "8", "flat")


def reward(completions, answers):
    return [0.5 if a == "flat" else len(set(c)) / 8.0 for c, a in zip(completions, answers)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def train(tokenizer, out_dir, *, skip, sparsity, steps=2):
    graphdef, params = nnx.split(init_model(tiny_config(len(tokenizer)), seed=0))
    config = GRPOConfig(steps=steps, prompts_per_step=4, num_generations=4, max_new_tokens=6,
                        micro_batch_size=4, generation_batch_size=16, loss_type="dapo",
                        save_every=0, eval_every=0, skip_zero_advantage=skip)
    trainer = GRPOTrainer(graphdef, params, tokenizer, reward, config,
                          TrainableConfig(sparsity=sparsity, learning_rate=1e-2), out_dir)
    grads, skipped = [], []
    apply = trainer.trainable.apply

    def recording_apply(params, acc, opt_state):
        grads.append(jax.tree.map(np.asarray, acc))
        return apply(params, acc, opt_state)

    trainer.trainable.apply = recording_apply
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    for _ in range(steps):
        skipped.append(trainer.train_step(ids, list(ANSWERS))["skipped_micro_batches"])
    return trainer, grads, skipped


def bits(tree):
    return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("sparsity", [0.9, 0.0])
def test_skipping_zero_advantage_micro_batches_is_exact(tokenizer, tmp_path, sparsity):
    on, grads_on, skipped_on = train(tokenizer, tmp_path / "on", skip=True, sparsity=sparsity)
    off, grads_off, skipped_off = train(tokenizer, tmp_path / "off", skip=False,
                                        sparsity=sparsity)
    assert sum(skipped_on) > 0, "no micro-batch was skipped: the check would be vacuous"
    assert sum(skipped_off) == 0
    assert any(s < 4 for s in skipped_on), "every micro-batch skipped: nothing trained"
    for g_on, g_off in zip(grads_on, grads_off):
        for a, b in zip(bits(g_on), bits(g_off)):
            np.testing.assert_array_equal(a, b)  # signed zeros included
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads_on[-1]))
    for a, b in zip(bits(on.params), bits(off.params)):
        np.testing.assert_array_equal(a, b)


def test_no_skipping_with_a_kl_term(tokenizer, tmp_path):
    graphdef, params = nnx.split(init_model(tiny_config(len(tokenizer)), seed=0))
    config = GRPOConfig(steps=1, prompts_per_step=4, num_generations=4, max_new_tokens=6,
                        micro_batch_size=4, generation_batch_size=16, beta=0.1,
                        save_every=0, eval_every=0)
    trainer = GRPOTrainer(graphdef, params, tokenizer, reward, config,
                          TrainableConfig(sparsity=0.9, learning_rate=1e-2), tmp_path)
    assert trainer._zero_gradient_micro_batches(np.zeros(16)) == [False] * 4
