"""Several optimizer steps per GRPO generation batch (TRL's ``steps_per_generation`` and
``num_iterations``) on the tiny random Qwen2: the old-policy log-probs are the sampling
policy's, the importance ratio leaves 1 after the first update, every row is trained on
once per pass, and a resume between the iterations of one batch continues bit for bit,
for sparse entries, full finetuning and LoRA."""

import jax
import numpy as np
import pytest
from flax import nnx
from test_grpo_trainer import TOKENIZER, tiny_config
from transformers import AutoTokenizer

from sparsejax.config import GRPOConfig
from sparsejax.lora import LoraConfig
from sparsejax.models.decoder import init_model
from sparsejax.models.logprobs import completion_logprobs
from sparsejax.trainable.lora import LoraAdapter
from sparsejax.trainers import GRPOTrainer, TrainableConfig

PROMPTS = ("1+1=", "two plus three", "4*2?", "seven")
ANSWERS = ("2", "5", "8", "7")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def reward(completions, answers):
    del answers
    return [len(set(c)) / 8.0 for c in completions]


def make(tokenizer, out_dir, steps, variant="sparse", **options):
    graphdef, params = nnx.split(init_model(tiny_config(len(tokenizer)), seed=0))
    settings = dict(steps=steps, prompts_per_step=2, num_generations=4, max_new_tokens=6,
                    micro_batch_size=4, generation_batch_size=16, save_every=1, eval_every=0,
                    epsilon=0.02, skip_zero_advantage=False)
    config = GRPOConfig(**{**settings, **options})
    trainable_cfg = TrainableConfig(sparsity=0.0 if variant == "full" else 0.9,
                                    learning_rate=3e-2 if variant != "full" else 3e-3)
    trainable = (LoraAdapter(trainable_cfg, params, LoraConfig(rank=2), seed=1)
                 if variant == "lora" else None)
    trainer = GRPOTrainer(graphdef, params, tokenizer, reward, config, trainable_cfg, out_dir,
                          trainable=trainable)
    calls = {"sample": 0, "batches": []}
    sample, grad_fn = trainer._sample, trainer._grad_fn

    def counted_sample(*args, **kwargs):
        calls["sample"] += 1
        return sample(*args, **kwargs)

    def recorded_grad_fn(*args):
        calls["batches"].append(jax.tree.map(np.asarray, args[-2]))
        return grad_fn(*args)

    trainer._sample, trainer._grad_fn = counted_sample, recorded_grad_fn
    return trainer, calls


def prompt_ids(tokenizer):
    return [tokenizer(q)["input_ids"] for q in PROMPTS]


def test_ratio_is_live_after_the_first_update(tokenizer, tmp_path):
    trainer, calls = make(tokenizer, tmp_path, steps=4, num_iterations=2, save_every=0)
    records = [trainer.train_step(prompt_ids(tokenizer), ANSWERS) for _ in range(4)]
    assert calls["sample"] == 2  # one generation per two optimizer steps
    assert [r["iteration"] for r in records] == [0, 1, 0, 1]
    assert [r["generation"] for r in records] == [0, 0, 1, 1]
    assert [r["generation_time"] > 0 for r in records] == [True, False, True, False]
    # Both passes train on the same rows with the same old log-probs.
    first, second = calls["batches"][:2], calls["batches"][2:4]
    for a, b in zip(first, second):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # The old log-probs are the sampling policy's (the params before the first update).
    graphdef, params = nnx.split(init_model(tiny_config(len(tokenizer)), seed=0))
    b = first[0]
    logps = completion_logprobs(graphdef, params, b["prompt_tokens"], b["prompt_mask"],
                                b["tokens"], b["mask"])
    np.testing.assert_allclose(b["old_logps"] * b["mask"], np.asarray(logps) * b["mask"],
                               atol=1e-6)
    # Ratio 1 in the first pass, not in the second: clipping acts.
    assert abs(records[0]["ratio/mean"] - 1.0) < 1e-5, records[0]
    assert abs(records[1]["ratio/mean"] - 1.0) > 1e-4, records[1]
    assert records[1]["clip_ratio/region_mean"] > 0, records[1]
    assert records[0]["clip_ratio/region_mean"] == 0, records[0]


def test_a_generation_batch_spread_over_steps_trains_each_row_once(tokenizer, tmp_path):
    # 2 micro-batches per optimizer step; 4 per generation: two steps share a generation.
    trainer, calls = make(tokenizer, tmp_path, steps=2, steps_per_generation=4, save_every=0)
    records = [trainer.train_step(prompt_ids(tokenizer), ANSWERS) for _ in range(2)]
    assert calls["sample"] == 1 and [r["generation"] for r in records] == [0, 0]
    rows = trainer.generation.arrays
    assert len(rows["tokens"]) == 16  # 2 steps x 2 prompts x 4 samples
    seen = np.concatenate([b["tokens"] for b in calls["batches"]])
    np.testing.assert_array_equal(seen, rows["tokens"])
    # Each prompt's group keeps its advantages (zero mean per group) after the shuffle.
    by_prompt = {}
    for p, a in zip(rows["prompt_tokens"], rows["advantages"]):
        by_prompt.setdefault(p.tobytes(), []).append(a)
    assert sorted(len(v) for v in by_prompt.values()) == [4, 4, 4, 4]
    for v in by_prompt.values():
        assert abs(float(np.mean(v))) < 1e-6
    # The loss normaliser is one optimizer step's share of the batch's tokens.
    assert trainer.generation.num_items == pytest.approx(rows["mask"].sum() / 2 / 2)


@pytest.mark.parametrize("variant", ["sparse", "full", "lora"])
def test_resume_between_iterations_is_exact(tokenizer, tmp_path, variant):
    options = dict(steps_per_generation=4, num_iterations=2)  # 4 steps per generation
    full, _ = make(tokenizer, tmp_path / "full", steps=6, variant=variant, **options)
    full.train(prompt_ids(tokenizer), ANSWERS, progress=False)
    part, _ = make(tokenizer, tmp_path / "part", steps=3, variant=variant, **options)
    part.train(prompt_ids(tokenizer), ANSWERS, progress=False)
    resumed, calls = make(tokenizer, tmp_path / "part", steps=6, variant=variant, **options)
    resumed.train(prompt_ids(tokenizer), ANSWERS, resume=True, progress=False)
    assert calls["sample"] == 1  # step 3 reused the stored batch; step 4 sampled anew
    moved = 0.0
    for a, b, c in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params),
                       jax.tree.leaves(part.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        moved = max(moved, float(np.max(np.abs(np.asarray(a) - np.asarray(c)))))
    assert moved > 1e-5, "the steps after the resume did not train; the check is vacuous"


def test_bad_settings_fail_in_one_line():
    with pytest.raises(ValueError, match="multiple of the micro-batches of one optimizer step"):
        GRPOConfig(prompts_per_step=2, num_generations=4, micro_batch_size=4,
                   steps_per_generation=3)
    with pytest.raises(ValueError, match="num_iterations"):
        GRPOConfig(num_iterations=0)
