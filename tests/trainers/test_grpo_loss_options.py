"""The GRPO trainer with the newer loss options on the tiny random Qwen2: a CISPO run that
masks truncated completions, adds the entropy bonus and warms up / decays its learning
rate, and an RLOO run (leave-one-out advantages, RLOO loss). Both take real steps through
``GRPOTrainer.train_step``; the batch the loss sees is checked against TRL's rules."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_grpo_trainer import TOKENIZER, tiny_config
from transformers import AutoTokenizer

from sparsejax.losses import rloo_advantages
from sparsejax.models.decoder import init_model
from sparsejax.trainers import GRPOConfig, GRPOTrainer, TrainableConfig

PROMPTS = ("1+1=", "two plus three", "4*2?", "seven")
ANSWERS = ("2", "5", "8", "7")
GENERATIONS = 4


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def make(tokenizer, out_dir, steps, lr_schedule, **options):
    """A trainer whose completions stop at every fifth token id (and the pad id): with 6
    new tokens, some stop and some use up the budget; the same sampling in every test
    (the rollout program compiles once)."""
    graphdef, params = nnx.split(init_model(tiny_config(len(tokenizer)), seed=0))
    config = GRPOConfig(steps=steps, prompts_per_step=len(PROMPTS), num_generations=GENERATIONS,
                        max_new_tokens=6, micro_batch_size=8, generation_batch_size=16,
                        save_every=0, eval_every=0, **options)
    rewards = []

    def reward(completions, answers):
        del answers
        rewards.append(np.asarray([len(set(c)) / 8.0 for c in completions]))
        return rewards[-1]

    stop = sorted({*range(0, len(tokenizer), 5), tokenizer.pad_token_id})
    trainer = GRPOTrainer(graphdef, params, tokenizer, reward, config,
                          TrainableConfig(sparsity=0.9, learning_rate=1e-2, **lr_schedule), out_dir,
                          stop_token_ids=stop)
    batches = []  # (batch, num_items) of each micro-batch: the gradient function's last arguments
    grad_fn = trainer._grad_fn
    trainer._grad_fn = lambda *args: batches.append(
        (jax.tree.map(np.asarray, args[-2]), float(args[-1]))) or grad_fn(*args)
    return trainer, batches, rewards, stop


def moved(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_cispo_with_truncation_masking_entropy_bonus_and_lr_schedule(tokenizer, tmp_path):
    trainer, batches, _, stop = make(
        tokenizer, tmp_path, steps=2, lr_schedule=dict(lr_scheduler_type="cosine", warmup_ratio=0.5),
        loss_type="cispo", epsilon_high=5.0, mask_truncated_completions=True, entropy_coef=0.01)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    start = jax.tree.map(np.asarray, trainer.params)
    first = trainer.train_step(ids, list(ANSWERS))
    # warm-up over ceil(0.5 x 2) = 1 step: the first step's learning rate is 0
    assert moved(trainer.params, start) == 0.0
    second = trainer.train_step(ids, list(ANSWERS))
    assert moved(trainer.params, start) > 1e-4
    for record in (first, second):
        assert np.isfinite(record["loss"]) and "cispo_clip_ratio" in record and "policy_loss" in record
        assert "clip_ratio/region_mean" not in record  # TRL logs no PPO clip fraction for cispo
    assert float(trainer.trainable.schedule(0)) == 0.0
    assert float(trainer.trainable.schedule(1)) == pytest.approx(1e-2)

    # The batch: TRL's rule (GRPOTrainer._generate_and_score_completions):
    # is_truncated = ids[-1] not in [*eos_token_ids, pad_token_id] for each completion's ids.
    truncated = np.concatenate([b["truncated"] for b, _ in batches[:2]])
    tokens = np.concatenate([b["tokens"] for b, _ in batches[:2]])
    mask = np.concatenate([b["mask"] for b, _ in batches[:2]])
    eos_and_pad = [*stop, tokenizer.pad_token_id]
    expected = np.asarray([int(t[m > 0][-1]) not in eos_and_pad for t, m in zip(tokens, mask)])
    np.testing.assert_array_equal(truncated, expected)
    assert 0 < truncated.sum() < len(truncated), "all or no completions truncated: a vacuous check"
    # num_items_in_batch counts the kept tokens only, per micro-batch (TRL: loss_mask.sum() after masking)
    assert batches[0][1] == pytest.approx((mask * ~truncated[:, None]).sum() / 2)


def test_rloo_advantages_and_loss(tokenizer, tmp_path):
    trainer, batches, rewards, _ = make(
        tokenizer, tmp_path, steps=1, lr_schedule=dict(lr_scheduler_type="linear"),
        loss_type="rloo", advantage_estimator="rloo", normalize_advantages=True)
    start = jax.tree.map(np.asarray, trainer.params)
    record = trainer.train_step([tokenizer(p)["input_ids"] for p in PROMPTS], list(ANSWERS))
    advantages = np.concatenate([b["advantages"] for b, _ in batches])
    np.testing.assert_allclose(advantages, rloo_advantages(rewards[0], GENERATIONS, normalize=True), rtol=1e-6)
    assert np.abs(advantages).max() > 0.1
    assert np.isfinite(record["loss"]) and "clip_ratio/region_mean" in record
    assert moved(trainer.params, start) > 1e-4
