"""The toy RLVR task (generator, tokenizer, reward, SFT batches) and its experiment script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sparsejax.data import toy_task as tt

from paths import REPO

ROOT = str(REPO)


@pytest.fixture(scope="module")
def tokenizer():
    return tt.build_tokenizer()


# ----------------------------------------------------------------------------- problems


def test_problems_are_deterministic_distinct_and_correct():
    a = tt.make_problems(200, seed=3, digits=2)
    b = tt.make_problems(200, seed=3, digits=2)
    assert a == b
    assert len({(p.a, p.b) for p in a}) == 200
    assert tt.make_problems(200, seed=4, digits=2) != a
    for p in a:
        assert 0 <= p.a < 100 and 0 <= p.b < 100
        assert p.prompt == f"{p.a}+{p.b}="
        assert int(p.answer) == p.a + p.b and p.answer == str(p.a + p.b)


def test_exclude_keeps_splits_disjoint():
    held_out = tt.make_problems(300, seed=1, digits=2)
    train = tt.make_problems(500, seed=2, digits=2, exclude=held_out)
    assert not {(p.a, p.b) for p in held_out} & {(p.a, p.b) for p in train}
    rng = np.random.default_rng(0)
    batch = tt.sample_batch(rng, 1000, 2, frozenset((p.a, p.b) for p in held_out))
    assert not {(p.a, p.b) for p in held_out} & {(p.a, p.b) for p in batch}
    with pytest.raises(ValueError):
        tt.make_problems(101, seed=0, digits=1)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary_and_special_ids(tokenizer):
    assert len(tokenizer) == len(tt.SPECIAL_TOKENS) + len(tt.CHARACTERS) == 16
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.unk_token_id) == (0, 1, 2, 3)
    ids = [tokenizer.convert_tokens_to_ids(c) for c in tt.CHARACTERS]
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in ids


@pytest.mark.parametrize("text", ["12+345=", "0+0=", "999+1=1000", "7", "+=+="])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == tt.BOS + text
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]


def test_decode_drops_eos_and_padding(tokenizer):
    ids = tokenizer("357", add_special_tokens=False)["input_ids"]
    seq = ids + [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(seq, skip_special_tokens=True) == "357"
    assert tt.reward_fn([tokenizer.decode(seq, skip_special_tokens=True)], ["357"]) == [1.0]


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer("1 2", add_special_tokens=False)["input_ids"]
    assert ids[1] == tokenizer.unk_token_id and len(ids) == 3


# ----------------------------------------------------------------------------- reward


@pytest.mark.parametrize("completion,answer,reward", [
    ("357", "357", 1.0),
    (" 357\n", "357", 1.0),  # surrounding whitespace is not part of the answer
    ("357", 357, 1.0),  # an int answer is compared in canonical form
    ("0", "0", 1.0),
    ("358", "357", 0.0),
    ("35", "357", 0.0),
    ("3570", "357", 0.0),
    ("0357", "357", 0.0),  # leading zeros are not the canonical answer
    ("00", "0", 0.0),
    ("35 7", "357", 0.0),
    ("357357", "357", 0.0),
    ("357=", "357", 0.0),
    ("+357", "357", 0.0),
    ("-357", "357", 0.0),
    ("357.0", "357", 0.0),
    ("1+2=357", "357", 0.0),
    ("\uff13\uff15\uff17", "357", 0.0),  # full-width digits are not ASCII digits
    ("\u0663\u0665\u0667", "357", 0.0),  # nor are Arabic-Indic digits
    ("", "357", 0.0),
    ("   ", "357", 0.0),
])
def test_reward_is_exact(completion, answer, reward):
    assert tt.reward_fn([completion], [answer]) == [reward]


def test_extract_answer_malformed_is_none():
    for bad in ["", "abc", "12a", "1 2", "01", "=", "+", "1e3"]:
        assert tt.extract_answer(bad) is None
    assert tt.extract_answer(" 42 ") == "42"


def test_reward_fn_checks_lengths():
    with pytest.raises(ValueError):
        tt.reward_fn(["1", "2"], ["1"])


# ----------------------------------------------------------------------------- SFT pieces


def test_sft_batch_masks_exactly_the_answer(tokenizer):
    probs = [tt.Problem(12, 34), tt.Problem(99, 99), tt.Problem(0, 5)]
    tokens, attn, loss = tt.sft_batch(tokenizer, probs, length=11)
    for i, p in enumerate(probs):
        seq = tokenizer(p.prompt)["input_ids"] + tokenizer(
            p.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokens[i, :len(seq)].tolist() == seq
        assert attn[i].sum() == len(seq)
        targets = tokens[i, 1:][loss[i].astype(bool)].tolist()
        assert targets == seq[len(seq) - len(p.answer) - 1:]
    with pytest.raises(ValueError):
        tt.sft_batch(tokenizer, [tt.Problem(99, 99)], length=8)


def test_model_config_is_tiny_qwen2(tokenizer):
    cfg = tt.model_config(tokenizer, hidden_size=32, num_layers=1)
    assert cfg.model_type == "qwen2" and cfg.qkv_bias and cfg.tie_word_embeddings
    assert cfg.vocab_size == len(tokenizer) and cfg.param_dtype == "float32"
    assert cfg.eos_token_ids == (tokenizer.eos_token_id,)


# ----------------------------------------------------------------------------- the script


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "toy"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "toy_rlvr.py"), "--quick",
         "--no-progress", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "results.md").read_text()
    for section in ["## Runs", "## (a)", "## (b)", "## (c)", "## (d)", "## (e)", "## (f)",
                    "## (g)", "## (h)"]:
        assert section in md, section
    assert md.count("**Verdict:**") == 8
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["measurements"]) == list("abcdefgh")
    assert sorted(res["verdicts"]) == list("abcdefgh")
    assert res["commit"] and res["versions"]["jax"] and res["device"]
    h = res["measurements"]["h"]
    assert [r["arm"] for r in h["rows"]][:4] == ["full", "random99", "lora", "masked_lora"]
    names = [r["name"] for r in res["runs"]]
    assert "full" in names and "diff-mask subnetwork" in names
    assert sum(n.startswith("random 99% seed") for n in names) >= 2
    for r in res["runs"]:
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert r["curve"][0][0] == 0 and r["curve"][-1][0] == res["config"]["steps"]
    b = res["measurements"]["b"]
    assert b["chance_jaccard"] == pytest.approx(b["density"] / (2 - b["density"]))
    d = res["measurements"]["d"]
    assert d["atol"] == 1e-5 and d["dtype"] == "bfloat16" and d["by_layer"] and d["by_type"]
    for name in ("accuracy_vs_step.png", "accuracy_vs_trainable.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_toy_run_refuses_a_locked_folder_in_one_line(tmp_path):
    """A second toy run on a folder another run holds stops at once (lock of run_dir)."""
    import fcntl
    import subprocess
    import sys
    out = tmp_path / "toy"
    out.mkdir()
    with open(out / ".lock", "w", encoding="utf-8") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("4242\n")
        holder.flush()
        script = REPO / "experiments" / "toy_rlvr.py"
        proc = subprocess.run([sys.executable, str(script), "--quick", "--no-progress",
                               "--out-dir", str(out)], capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another run" in lines[0], lines


# ----------------------------------------------------------------------------- (h) arms


def test_every_lora_arm_runs_and_trains_what_its_mask_says(tmp_path):
    """Section (h) for 2 GRPO steps on an untrained tiny model with given ratios: every
    LoRA arm runs through the trainers' seam (full FT and the 99% mask run the same
    ``Experiment.run`` path as (a)-(g): the slow --quick test), and each trainable count
    is the documented count of its kind (LoRA r (in + out); floor(d numel) per factor
    for random masks, round for Targeted-LoRA's top-k)."""
    import dataclasses

    import toy_lora
    import toy_rlvr
    from toy_runs import Experiment, host_copy

    from sparsejax import lora
    preset = dataclasses.replace(toy_rlvr.QUICK, steps=2, eval_points=0, test=8,
                                 train_prompts=16, lora_seeds=(0,))
    exp = Experiment(preset, 0, False, str(tmp_path / "work"))
    exp.base = host_copy(exp._init_params)
    exp.base_accuracy = 0.0
    shapes = lora.kernel_shapes(exp.base)
    paths = lora.select_targets(exp.base, preset.lora_targets)
    table = {p: (0.0, 0.3, 0.6)[i % 3] for i, p in enumerate(paths)}
    ratios = lora.Ratios(ratios=table, kernels={p: list(shapes[p]) for p in paths})
    runs: dict = {}
    h = toy_lora.run_lora_section(exp, toy_rlvr.LEARNING_RATES, 1e-3, runs,
                                  lambda r: runs.__setitem__(r.name, r),
                                  str(tmp_path / "lora_ratios.json"), ratios=ratios,
                                  arms=("lora", "masked_lora", "partial_lora",
                                        "targeted_lora"))
    assert lora.load_ratios(tmp_path / "lora_ratios.json", exp.base).ratios == table
    rows = {r["arm"]: r for r in h["rows"]}
    assert list(rows) == ["lora", "masked_lora", "partial_lora", "targeted_lora"]
    for r in runs.values():
        assert len(r.train_reward) == 2 and r.curve[-1][0] == 2
    r_ = preset.lora_rank
    factors = {p: (shapes[p][0] * r_, r_ * shapes[p][1]) for p in paths}
    dense = sum(a + b for a, b in factors.values())
    d = preset.lora_density
    expect = {
        "lora": dense,
        "masked_lora": sum(int(np.floor(d * a)) + int(np.floor(d * b))
                           for a, b in factors.values()),
        "partial_lora": sum(int(np.floor((1 - table[p]) * a + 1e-6))
                            + int(np.floor((1 - table[p]) * b + 1e-6))
                            for p, (a, b) in factors.items()),
        "targeted_lora": sum(int(round((1 - table[p]) * a)) + int(round((1 - table[p]) * b))
                             for p, (a, b) in factors.items()),
    }
    assert {k: v["trainable"] for k, v in rows.items()} == expect
    assert rows["lora"]["fraction_of_lora"] == 1.0
    assert rows["partial_lora"]["fraction_of_lora"] < 1.0
    # The budget-matched uniform arm (not run here): one density, Partial-LoRA's count.
    uniform = toy_lora.arm_trainable(exp, "uniform_lora", 1e-3, seed=0,
                                   ratios_path=str(tmp_path / "lora_ratios.json"))
    dm = toy_lora.matched_density(ratios)
    assert dm == pytest.approx(expect["partial_lora"] / dense, abs=0.01)
    assert uniform.num_trainable(None) == sum(int(np.floor(dm * a)) + int(np.floor(dm * b))
                                              for a, b in factors.values())
    assert "Partial-LoRA trains" in toy_lora.lora_verdict(h)
    assert any("(h)" in line for line in toy_lora.lora_markdown(h, "v"))
