"""GRPO trainer and experiments/grpo_gsm8k.py end to end on a tiny random Qwen2."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from sparsejax.data.order import prompt_order
from sparsejax.models import config as model_config
from sparsejax.models.decoder import init_model
from sparsejax.trainers import GRPOConfig, GRPOTrainer, TrainableConfig

from paths import REPO

ROOT = REPO
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "qwen2.5"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def tiny_config(vocab: int) -> model_config.DecoderConfig:
    return model_config.DecoderConfig(
        model_type="qwen2", vocab_size=vocab, hidden_size=16, intermediate_size=32,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=True,
        tie_word_embeddings=True, param_dtype="float32")


def distinct_chars_reward(completions, answers):
    """A reward with signal on a random model: more distinct characters is better."""
    del answers
    return [len(set(c)) / 8.0 for c in completions]


def make_trainer(tokenizer, out_dir, steps, beta):
    graphdef, params = nnx.split(init_model(tiny_config(len(tokenizer)), seed=0))
    config = GRPOConfig(steps=steps, prompts_per_step=2, num_generations=4, max_new_tokens=6,
                        micro_batch_size=4, generation_batch_size=8, beta=beta,
                        save_every=1, eval_batch_size=4)
    sparse = TrainableConfig(sparsity=0.9, learning_rate=1e-2)
    return GRPOTrainer(graphdef, params, tokenizer, distinct_chars_reward, config, sparse,
                       out_dir)


def test_resume_continues_exactly(tokenizer, tmp_path):
    prompts = [tokenizer(q)["input_ids"] for q in ("1+1=", "two plus three", "4*2?")]
    answers = ["2", "5", "8"]
    full = make_trainer(tokenizer, tmp_path / "full", steps=3, beta=0.05)
    base = jax.tree.map(np.asarray, full.params)
    full.train(prompts, answers, progress=False)
    part = make_trainer(tokenizer, tmp_path / "part", steps=1, beta=0.05)
    part.train(prompts, answers, progress=False)
    resumed = make_trainer(tokenizer, tmp_path / "part", steps=3, beta=0.05)
    resumed.train(prompts, answers, resume=True, progress=False)
    moved = 0.0
    for a, b, p0 in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params),
                        jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        moved = max(moved, float(np.max(np.abs(np.asarray(a) - p0))))
    assert moved > 1e-4, "training did not move the params; the check would be vacuous"
    # Off the mask nothing moved.
    dense = full.trainable.mask
    for idx, a, p0 in zip(jax.tree.leaves(dense), jax.tree.leaves(full.params),
                          jax.tree.leaves(base)):
        off = np.ones(p0.size, bool)
        off[np.asarray(idx).reshape(-1)] = False
        np.testing.assert_array_equal(np.asarray(a).reshape(-1)[off], p0.reshape(-1)[off])
    records = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text()
               .splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [0, 1, 2]
    assert all("kl" in r for r in records if r["kind"] == "train")


def test_prompt_order_is_a_permutation_per_epoch():
    seen = np.concatenate([prompt_order(10, s, 4, seed=3) for s in range(5)])
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    np.testing.assert_array_equal(prompt_order(10, 2, 4, 3), prompt_order(10, 2, 4, 3))


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory, tokenizer):
    from tiny_models import save_tiny_qwen2
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"), tokenizer)


def run_script(model, out_dir, *extra):
    """Runs experiments/grpo_gsm8k.py; the runs share a persistent compilation cache beside
    the model (speed only: a cached executable is the same compiled program)."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(Path(model).parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, str(ROOT / "experiments" / "grpo_gsm8k.py"), "--model", str(model),
           "--data-dir", str(SHARED / "data" / "gsm8k"), "--train-limit", "8",
           "--eval-limit", "4", "--prompts-per-step", "2", "--num-generations", "4",
           "--max-new-tokens", "8", "--micro-batch-size", "4", "--generation-batch-size", "8",
           "--eval-batch-size", "4", "--eval-every", "0", "--save-every", "1",
           "--dtype", "float32", "--sparsity", "0.9", "--lr", "1e-2",
           # Rewards of a random model are all 0; weight decay still moves the params.
           "--weight-decay", "0.1", "--out-dir", str(out_dir), "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_grpo_gsm8k_script_runs_and_resumes(tiny_hf_model, tmp_path):
    full = run_script(tiny_hf_model, tmp_path / "full", "--steps", "2")
    assert full.returncode == 0, full.stderr[-3000:]
    for name in ("metrics.jsonl", "curves.png", "final_eval.json",
                 "final_model/model.safetensors", "final_model/config.json",
                 "final_model/tokenizer.json"):
        assert (tmp_path / "full" / name).exists(), name
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    final_eval = json.loads((tmp_path / "full" / "final_eval.json").read_text())
    assert final_eval["eval_examples"] == 4 and 0.0 <= final_eval["eval_accuracy"] <= 1.0

    part = run_script(tiny_hf_model, tmp_path / "part", "--steps", "1")
    assert part.returncode == 0, part.stderr[-3000:]
    resumed = run_script(tiny_hf_model, tmp_path / "part", "--steps", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "full" / "final_model" / "model.safetensors")
    b = load_file(tmp_path / "part" / "final_model" / "model.safetensors")
    base = load_file(tiny_hf_model / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(not np.array_equal(a[n], base[n]) for n in a), "nothing trained"


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], "sparsity"),
    (["--data-dir", "/nonexistent/gsm8k"], "GSM8K"),
    (["--prompts-per-step", "3", "--micro-batch-size", "5"], "multiple"),
])
def test_grpo_gsm8k_bad_arguments(args, message, tiny_hf_model):
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "grpo_gsm8k.py"),
                          "--model", str(tiny_hf_model), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


def test_grpo_gsm8k_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "grpo_gsm8k.py"),
                          "--model", str(tmp_path), "--data-dir", str(SHARED / "data" / "gsm8k"),
                          "--train-limit", "2", "--eval-limit", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "gpt2" in out.stderr


def test_new_run_refuses_an_earlier_runs_checkpoints(tmp_path, tiny_hf_model, tokenizer):
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "grpo_gsm8k.py"),
                          "--model", str(tiny_hf_model), "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--resume" in out.stderr and "Traceback" not in out.stderr
    # The library refuses too, before touching anything.
    trainer = make_trainer(tokenizer, tmp_path / "lib", steps=1, beta=0.0)
    trainer.save_checkpoint()
    again = make_trainer(tokenizer, tmp_path / "lib", steps=1, beta=0.0)
    with pytest.raises(ValueError, match="earlier run"):
        again.train([[1, 2, 3]], ["1"], progress=False)


def test_training_batch_is_trimmed_to_the_longest_completion(tokenizer, tmp_path):
    graphdef, params = nnx.split(init_model(tiny_config(len(tokenizer)), seed=0))
    config = GRPOConfig(steps=1, prompts_per_step=2, num_generations=2, max_new_tokens=32,
                        micro_batch_size=4, generation_batch_size=4)
    # Every token stops a completion: each is one token long.
    trainer = GRPOTrainer(graphdef, params, tokenizer, distinct_chars_reward, config,
                          TrainableConfig(sparsity=0.9), tmp_path,
                          stop_token_ids=range(len(tokenizer)))
    widths = []
    grad_fn = trainer._grad_fn
    trainer._grad_fn = lambda acc, p, s, batch, n: widths.append(batch["tokens"].shape[1]) \
        or grad_fn(acc, p, s, batch, n)
    record = trainer.train_step([[1, 2, 3], [4, 5]], ["1", "2"])
    assert record["completion_length"] == 1.0
    assert widths == [8]  # bucket_length(1), not max_new_tokens


def test_hugging_face_snapshots_every_n_steps(tokenizer, tmp_path):
    from sparsejax.models.hf_io import load_hf
    prompts = [tokenizer(q)["input_ids"] for q in ("1+1=", "two plus three")]
    trainer = make_trainer(tokenizer, tmp_path, steps=2, beta=0.0)
    trainer.cfg = dataclasses.replace(trainer.cfg, save_hf_every=1)
    after = [jax.tree.map(np.asarray, trainer.params)]
    step = trainer.train_step
    trainer.train_step = lambda *a: (step(*a), after.append(
        jax.tree.map(np.asarray, trainer.params)))[0]
    trainer.train(prompts, ["2", "5"], progress=False)
    for n in (1, 2):  # each snapshot holds the policy after its step, whole
        folder = tmp_path / "snapshots" / f"step_{n:06d}"
        loaded = nnx.split(load_hf(folder))[1]
        for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(after[n])):
            np.testing.assert_array_equal(np.asarray(got), want)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after[1]),
                                                          jax.tree.leaves(after[2])))


def test_a_sparse_run_writes_its_mask_for_mask_path(tokenizer, tmp_path):
    from sparsejax.masks import load_mask
    prompts = [tokenizer(q)["input_ids"] for q in ("1+1=", "two plus three")]
    trainer = make_trainer(tokenizer, tmp_path, steps=1, beta=0.0)
    trainer.train(prompts, ["2", "5"], progress=False)
    mask, meta = load_mask(str(tmp_path / "mask.safetensors"), like=trainer.params)
    for got, want in zip(jax.tree.leaves(mask), jax.tree.leaves(trainer.trainable.mask)):
        np.testing.assert_array_equal(got, np.asarray(want))
    assert int(meta["total"]) == sum(x.size for x in jax.tree.leaves(trainer.params))


def test_eval_on_start_scores_the_base_model_first(tokenizer, tmp_path):
    prompts = [tokenizer(q)["input_ids"] for q in ("1+1=", "two plus three")]
    trainer = make_trainer(tokenizer, tmp_path, steps=1, beta=0.0)
    trainer.cfg = dataclasses.replace(trainer.cfg, eval_on_start=True, eval_every=0)
    base = trainer.evaluate(prompts, ["2", "5"])
    trainer.train(prompts, ["2", "5"], eval_prompt_ids=prompts, eval_answers=["2", "5"],
                  progress=False)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    kinds = [(r["kind"], r["step"]) for r in records if r["kind"] != "config"]
    assert kinds == [("eval", 0), ("train", 0), ("eval", 1)], kinds
    assert records[1]["eval_samples"] == base["eval_samples"]
