"""DPO trainer: log-prob parity with transformers, the swapped-in reference, and the
``experiments/dpo.py`` CLI (sparse and full runs, exact resume, learning, bad arguments)
on a tiny Qwen2 model with the real Qwen2.5 tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from sparsejax.config import DPOConfig, TrainableConfig
from sparsejax.config.names import DPO_LOSS_TYPES
from sparsejax.models import load_hf
from sparsejax.trainers.dpo import DPOTrainer, encode_pairs, split_pair
from sparsejax.trainers.dpo_logps import pair_token_logps

from paths import REPO

ROOT = REPO
TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen2.5"
SCRIPT = ROOT / "experiments" / "dpo.py"


def toy_pairs(n: int) -> list[dict]:
    """Trivially separable preferences: chosen always "yes", rejected always "no"."""
    return [{"prompt": f"Is {i} + {i} = {2 * i}?", "chosen": "yes", "rejected": "no"}
            for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen2 (transformers) saved with the real tokenizer, plus a dataset."""
    root = tmp_path_factory.mktemp("dpo")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, tie_word_embeddings=True, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so log-probs vary
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.copy_(0.3 * torch.randn_like(p))
    model_dir = root / "model"
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "data"
    data.mkdir()
    for split, pairs in (("train", toy_pairs(8)), ("test", toy_pairs(12)[8:])):
        with open(data / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
    return {"root": root, "model": model_dir, "data": data, "hf": hf, "tok": tok}


def run_cli(tiny, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs experiments/dpo.py; the runs share a persistent compilation cache (speed only:
    a cached executable is the same compiled program)."""
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tiny["root"] / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--no-progress", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def cli_args(tiny, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--model", tiny["model"], "--dataset", tiny["data"], "--dtype", "float32",
            "--out-dir", out, "--steps", steps, "--batch-size", 4, "--micro-batch-size", 2,
            "--max-prompt-length", 64, "--max-completion-length", 8, "--backend", "xla",
            "--logprob-chunk-size", 64, "--save-every", 0, "--eval-every", 0, *extra]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- data


def test_split_pair_formats():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert split_pair({"prompt": "q", "chosen": "a", "rejected": "b"}) == ("q", "a", "b")
    prompt, c, r = split_pair({"chosen": msgs, "rejected": msgs[:1] + [
        {"role": "assistant", "content": "b"}]})
    assert (prompt, c, r) == ([msgs[0]], "a", "b")
    with pytest.raises(ValueError, match="rejected"):
        split_pair({"prompt": "q", "chosen": "a"})


def test_encode_pairs_truncates_and_pads(tiny):
    tok = tiny["tok"]
    long = " ".join(["word"] * 100)
    enc = encode_pairs(tok, [{"prompt": long, "chosen": long, "rejected": "no"}],
                       max_prompt_length=16, max_completion_length=8)
    assert enc.prompt_tokens.shape == (1, 16) and enc.chosen_tokens.shape == (1, 8)
    full = tok(tok.apply_chat_template([{"role": "user", "content": long}], tokenize=False,
                                       add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert enc.prompt_tokens[0].tolist() == full[-16:]  # kept the end (generation prompt)
    assert enc.chosen_mask.sum() == 8  # cut from the right
    no = tok("no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.rejected_tokens[0, :len(no)].tolist() == no
    assert enc.rejected_mask[0].tolist() == [1] * len(no) + [0] * (8 - len(no))


# ---------------------------------------------------------------------- parity


def _trainer(tiny, tmp_path, sparsity: float, **cfg) -> DPOTrainer:
    graphdef, params = nnx.split(load_hf(tiny["model"]))
    config = DPOConfig(steps=2, batch_size=2, micro_batch_size=2,
                       max_prompt_length=64, max_completion_length=8,
                       logprob_chunk_size=64, **cfg)
    sparse = TrainableConfig(sparsity=sparsity, learning_rate=5e-2, backend="xla")
    return DPOTrainer(graphdef, params, tiny["tok"], config, sparse, tmp_path)


def torch_sequence_logprob(hf, prompt: list[int], completion: list[int]) -> float:
    """Sum of log p(completion token | prefix) from the transformers model."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([prompt + completion])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(completion))


def test_sparse_logprobs_match_transformers_and_reference_is_the_base(tiny, tmp_path):
    pairs = [{"prompt": "Hello there", "chosen": "General Kenobi!", "rejected": "no"},
             {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4",
              "rejected": [{"role": "assistant", "content": "five, surely"}]}]
    trainer = _trainer(tiny, tmp_path, 0.9)
    enc = trainer.encode(pairs)
    chosen, rejected = trainer.sequence_logprobs(enc)
    for i in range(len(pairs)):
        prompt = enc.prompt_tokens[i][enc.prompt_mask[i] == 1].tolist()
        for side, got in (("chosen", chosen[i]), ("rejected", rejected[i])):
            comp = getattr(enc, f"{side}_tokens")[i][getattr(enc, f"{side}_mask")[i] == 1]
            want = torch_sequence_logprob(tiny["hf"], prompt, comp.tolist())
            assert abs(got - want) < 1e-4, (i, side, got, want)

    # Move the k active entries (as training does); the reference stays the base model.
    base = np.stack([chosen, rejected])
    indices = trainer.opt_state.indices
    moved_values = jax.tree.map(lambda v: v + 0.5,
                                trainer.trainable.active_values(trainer.params, trainer.opt_state))
    trainer.params, _ = trainer.trainable.swap_active(trainer.params, indices, moved_values)
    moved = np.stack(trainer.sequence_logprobs(enc))
    assert np.abs(moved - base).max() > 1e-2
    np.testing.assert_allclose(np.stack(trainer.reference_logprobs(enc)), base, atol=1e-6)
    np.testing.assert_array_equal(np.stack(trainer.sequence_logprobs(enc)), moved)

    record = trainer.evaluate(pairs)
    assert record["kind"] == "eval" and record["eval_pairs"] == 2
    want_margin = 0.1 * np.mean((moved[0] - base[0]) - (moved[1] - base[1]))
    assert abs(record["eval_rewards/margins"] - want_margin) < 1e-4


def test_dense_reference_after_training_is_the_base(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, 0.0)
    enc = trainer.encode(toy_pairs(4))
    base = np.stack(trainer.sequence_logprobs(enc))
    zeros = np.zeros((enc.num_pairs, 2), np.float32)
    for _ in range(2):
        record = trainer.train_step(enc, zeros)
    assert record["step"] == 1 and np.isfinite(record["loss"])
    moved = np.stack(trainer.sequence_logprobs(enc))
    assert np.abs(moved - base).max() > 1e-3
    np.testing.assert_allclose(np.stack(trainer.reference_logprobs(enc)), base, atol=1e-6)
    np.testing.assert_array_equal(np.stack(trainer.sequence_logprobs(enc)), moved)


# ---------------------------------------------------------------------- the loss family

# (WPO weights and an f-divergence train in tests/parallel/test_sharded_training.py, on one
# device and on eight.)
FAMILY = {
    # Every loss type in one weighted sum (one compiled program), with LD-DPO.
    "every_type_ld": dict(loss_type=DPO_LOSS_TYPES, label_smoothing=0.1, ld_alpha=0.5,
                          loss_weights=tuple(0.1 if t in ("ipo", "sppo_hard") else 1.0
                                             for t in DPO_LOSS_TYPES)),
    # Losses that use no reference: none is scored.
    "simpo_orpo": dict(loss_type=("simpo", "orpo", "sft"), beta=2.0),
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_loss_family_trains_the_tiny_model(tiny, tmp_path, name):
    options = FAMILY[name]
    trainer = _trainer(tiny, tmp_path, 0.9, **options)
    # Chosen completions longer than the rejected ones (LD-DPO's tail is not empty).
    pairs = [{"prompt": f"Is {i} even?", "chosen": f"yes, {i} is even", "rejected": "no"}
             for i in (2, 4)]
    enc = trainer.encode(pairs)
    assert (enc.chosen_mask.sum(1) > enc.rejected_mask.sum(1)).all()
    ref = np.stack(trainer.reference_logprobs(enc), axis=1)
    uses_reference = name != "simpo_orpo"
    assert (trainer.base_policy is not None) == uses_reference
    if not uses_reference:
        np.testing.assert_array_equal(ref, 0.0)
    records = [trainer.train_step(enc, ref) for _ in range(4)]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records), records
    if uses_reference:  # the policy starts as the reference, reduced the same way
        assert abs(records[0]["rewards/margins"]) < 1e-5, records[0]
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    if name == "every_type_ld":  # the whole-set loss from per-token log-probs, as a step's
        final = trainer._evaluate_encoded(enc, ref)
        np.testing.assert_allclose(final["eval_loss"], trainer.train_step(enc, ref)["loss"],
                                   rtol=1e-5)
        assert final["eval_accuracy"] == 1.0, final


def test_wpo_statistic_matches_transformers(tiny):
    """``log sum_v p(v)^2`` per completion token (WPO), against the torch model."""
    graphdef, params = nnx.split(load_hf(tiny["model"]))
    enc = encode_pairs(tiny["tok"], [{"prompt": "Hello", "chosen": "Hi there", "rejected": "no"}],
                       max_prompt_length=16, max_completion_length=8)
    got = pair_token_logps(graphdef, params, enc._asdict(), chunk_size=5, with_sq=True)
    plain = pair_token_logps(graphdef, params, enc._asdict(), chunk_size=5)
    prompt = enc.prompt_tokens[0][enc.prompt_mask[0] == 1].tolist()
    for side in ("chosen", "rejected"):
        np.testing.assert_array_equal(got[side], plain[side])
        mask = getattr(enc, f"{side}_mask")[0]
        comp = getattr(enc, f"{side}_tokens")[0][mask == 1].tolist()
        with torch.no_grad():
            logits = tiny["hf"](input_ids=torch.tensor([prompt + comp])).logits[0].double()
        logp = torch.log_softmax(logits, -1)[len(prompt) - 1:len(prompt) - 1 + len(comp)]
        want = torch.logsumexp(2 * logp, -1).numpy()
        np.testing.assert_allclose(np.asarray(got[f"{side}_sq"])[0, :len(comp)], want, atol=1e-4)
        assert np.all(np.asarray(got[f"{side}_sq"])[0, len(comp):] == 0)


# ---------------------------------------------------------------------- CLI


def test_cli_sparse_run_learns_and_resumes_exactly(tiny):
    root = tiny["root"]
    full = root / "full"
    run_cli(tiny, *cli_args(tiny, full, 6, "--sparsity", 0.9, "--lr", 3e-2, "--save-every", 3))
    records = read_metrics(full)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(6))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "grad_norm", "step_time", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    # Throughput without compilation: step 0 compiles, later steps reuse the programs.
    assert train[0]["compile_time"] > 10 * max(r["compile_time"] for r in train[2:]) >= 0
    for r in train:
        np.testing.assert_allclose(r["tokens_per_s"],
                                   r["tokens"] / (r["step_time"] - r["compile_time"]), rtol=1e-3)
    final = json.loads((full / "final_eval.json").read_text())
    assert final["eval_pairs"] == 4 and final["eval_accuracy"] == 1.0
    assert (full / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["3", "6"]
    assert (full / "final_model" / "model.safetensors").exists()

    # A run stopped after step 3 (its last checkpoint is step 3), resumed to the end.
    split = root / "split"
    shutil.copytree(full / "checkpoints", split / "checkpoints")
    shutil.rmtree(split / "checkpoints" / "6")
    shutil.copy(full / "metrics.jsonl", split / "metrics.jsonl")
    run_cli(tiny, *cli_args(tiny, split, 6, "--sparsity", 0.9, "--lr", 3e-2, "--save-every", 3,
                            "--resume"))
    a = load_file(full / "final_model" / "model.safetensors")
    b = load_file(split / "final_model" / "model.safetensors")
    base = load_file(tiny["model"] / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(not np.array_equal(a[n], base[n]) for n in a)
    resumed = read_metrics(split)
    assert [r["resumed_from"] for r in resumed if r["kind"] == "config"] == [None, 3]
    resumed_train = [r for r in resumed if r["kind"] == "train"]
    assert [r["step"] for r in resumed_train] == list(range(6))
    assert [r["loss"] for r in resumed_train] == [r["loss"] for r in train]


def test_cli_full_finetuning(tiny):
    out = tiny["root"] / "dense"
    run_cli(tiny, *cli_args(tiny, out, 2, "--sparsity", 0, "--lr", 1e-3, "--eval-split", ""))
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert len(train) == 2 and all(np.isfinite(r["loss"]) for r in train)
    config = read_metrics(out)[0]
    assert config["trainable_sparsity"] == 0.0
    assert config["trainable"] == sum(x.size for x in load_file(
        tiny["model"] / "model.safetensors").values())
    assert not (out / "final_eval.json").exists()
    assert (out / "final_model" / "model.safetensors").exists()


def test_cli_lora_adapter_run_saves_merged_model_and_peft_adapter(tiny):
    out = tiny["root"] / "lora"
    run_cli(tiny, *cli_args(tiny, out, 2, "--adapter", "lora", "--lora-rank", 2,
                            "--lora-density", 0.5, "--lr", 1e-2, "--eval-split", ""))
    config = read_metrics(out)[0]
    base = load_file(tiny["model"] / "model.safetensors")
    assert 0 < config["trainable"] < sum(x.size for x in base.values()) / 10
    adapter = out / "final_model" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    factors = load_file(adapter / "adapter_model.safetensors")
    assert any(".lora_B." in name and np.any(v != 0) for name, v in factors.items())
    merged = load_file(out / "final_model" / "model.safetensors")
    assert any(not np.array_equal(merged[n], base[n]) for n in base)


@pytest.mark.parametrize("extra,needle", [
    (["--adapter", "lora", "--lora-rank", "0"], "--lora-rank"),
    (["--adapter", "partial-lora"], "--lora-ratios"),
    (["--adapter", "lora", "--lora-density", "1.5"], "--lora-density"),
])
def test_cli_bad_adapter_flags_fail_in_one_line(tiny, cli, capsys, extra, needle):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tiny["model"]), "--dataset", str(tiny["data"]),
                  "--out-dir", str(tiny["root"] / "bad_adapter"), *extra])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cli():
    """experiments/dpo.py imported in-process (argument errors need no new interpreter)."""
    spec = importlib.util.spec_from_file_location("dpo_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra,needle", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--dataset", "missing/nowhere.jsonl"], "not found"),
    (["--loss-type", "bogus"], "loss-type"),
    (["--dataset", "COLUMNS"], "chosen"),
    (["--batch-size", "3"], "multiple"),
    (["--loss-type", "hinge", "--label-smoothing", "0.1"], "--label-smoothing"),
    (["--eval-limit", "0"], "--eval-limit must be >= 1"),
    (["--loss-type", "sigmoid", "--loss-type", "nope"], "--loss-type"),
    (["--loss-type", "sigmoid", "--loss-type", "sft", "--loss-weights", "1"],
     "--loss-weights has 1 weights for 2 loss types"),
    (["--loss-weights", "1", "--loss-weights", "2"], "--loss-weights has 2 weights for 1"),
    (["--loss-type", "exo_pair"], "--label-smoothing must be > 0"),
    (["--loss-type", "aot", "--use-weighting"], "--use-weighting"),
    (["--loss-type", "bco_pair", "--f-divergence-type", "js_divergence"], "--f-divergence-type"),
    (["--ld-alpha", "1.5"], "--ld-alpha"),
    (["--discopop-tau", "0"], "--discopop-tau"),
])
def test_cli_bad_arguments_fail_in_one_line(tiny, cli, capsys, extra, needle):
    if "COLUMNS" in extra:
        bad = tiny["root"] / "bad.jsonl"
        bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
        extra = ["--dataset", str(bad)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tiny["model"]), "--dataset", str(tiny["data"]), *extra])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert needle in lines[-1] and "error:" in lines[-1], lines
    assert not any(line.startswith("Traceback") for line in lines)


def test_cli_bad_argument_in_a_real_process(tiny):
    proc = run_cli(tiny, "--model", tiny["model"], "--dataset", tiny["root"] / "none.jsonl",
                   check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: dataset file '{tiny['root'] / 'none.jsonl'}' not found"]


def test_help(cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--reference-free", "--loss-type", "--sparsity",
                                        "--resume", "--eval-split", "--limit"))
