"""The papers' experiments end to end at the quick scale (the shipped demo model): every
pipeline runs, its numbers agree with an independent recomputation from the files the arms
left, arms are cached and a changed setting is refused, and every arm of every scale is a
valid ``sparsejax grpo`` command."""

from __future__ import annotations

import itertools
import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from sparsejax.reproduce import __main__ as reproduce
from sparsejax.reproduce.scales import SCALES
from sparsejax.reproduce.suite import Suite, SuiteError


@pytest.fixture(scope="module")
def suite_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    assert reproduce.main(["all", "--scale", "quick", "--root", str(root), "--quiet"]) == 0
    return root


def result(root, name):
    with open(root / "results" / f"{name}_quick.json") as f:
        return json.load(f)


def mask_sets(path):
    """{tensor path: set of indices} read straight from a mask file."""
    return {k: set(np.asarray(v).tolist()) for k, v in load_file(path).items()}


def hf_tensors(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.mark.parametrize("name", ["multiple_tickets", "subnetworks", "predicted_masks"])
def test_every_experiment_writes_tables_plots_and_verdicts(suite_root, name):
    r = result(suite_root, name)
    assert r["verdicts"] and all(v["verdict"] in ("holds", "does not hold", "inconclusive",
                                                  "finding") for v in r["verdicts"].values())
    for ext in ("md", "png"):
        assert (suite_root / "results" / f"{name}_quick.{ext}").stat().st_size > 0
    assert r["commit"] and r["versions"]["jax"] and r["scale"]["name"] == "quick"
    for arm, folder in r["arms"].items():
        assert os.path.exists(os.path.join(folder, "finished.json")), arm


def test_ticket_overlap_matches_set_arithmetic(suite_root):
    r = result(suite_root, "multiple_tickets")
    masks = [mask_sets(suite_root / "arms" / f"random99_mask{j}" / "mask.safetensors")
             for j in range(3)]
    for row, (a, b) in zip(r["tables"]["ticket_overlap"], itertools.combinations(masks, 2)):
        inter = sum(len(a[k] & b[k]) for k in a)
        union = sum(len(a[k] | b[k]) for k in a)
        assert row["jaccard"] == pytest.approx(inter / union)
    accs = {row["arm"]: row["final_accuracy"] for row in r["tables"]["accuracy"]}
    for j in range(3):
        with open(suite_root / "arms" / f"random99_mask{j}" / "final_eval.json") as f:
            assert accs[f"random99_mask{j}"] == json.load(f)["eval_accuracy"]


def test_update_sparsity_and_subnetwork_match_a_numpy_diff(suite_root):
    r = result(suite_root, "subnetworks")
    base = hf_tensors(SCALES["quick"].model_path())
    full = hf_tensors(suite_root / "arms" / "full" / "final_model")
    unchanged = {}
    for dtype, cast in (("bfloat16", ml_dtypes.bfloat16), ("float32", np.float32)):
        unchanged[dtype] = sum(int((np.abs(full[k].astype(cast).astype(np.float32)
                                           - base[k].astype(cast).astype(np.float32)) <= 1e-5)
                                   .sum()) for k in base)
    for row in r["tables"]["update_sparsity"]:
        assert row["unchanged"] == unchanged[row["dtype"]], row["dtype"]
    # The subnetwork arm trained exactly the entries that changed (bf16, 1e-5).
    trained = sum(len(v) for v in mask_sets(suite_root / "arms" / "subnetwork" /
                                            "mask.safetensors").values())
    assert trained == sum(t.size for t in base.values()) - unchanged["bfloat16"]


def test_arms_are_cached_and_changed_settings_refused(suite_root, capsys):
    suite = Suite(SCALES["quick"], suite_root, quiet=True)
    arm = suite.arm("random99_mask1", sparsity=0.99, mask_seed=1)
    assert suite.ran == [] and arm.accuracy == result(suite_root, "multiple_tickets")[
        "tables"]["accuracy"][3]["final_accuracy"]
    with pytest.raises(SuiteError, match="other settings") as err:
        suite.arm("random99_mask1", sparsity=0.999, mask_seed=1)
    assert "\n" not in str(err.value)


def test_alternatives_budgets_match_the_kernel_shapes(suite_root):
    """The optional experiment (run on the cached full and random 99% arms): LoRA's rank
    gives about the random mask's budget, masked LoRA the same budget at 4x the rank, by
    the demo model's kernel shapes read from its safetensors; the 80/20 arm trained with
    the top-20% quantile."""
    assert reproduce.main(["alternatives", "--scale", "quick", "--root", str(suite_root),
                           "--quiet"]) == 0
    r = result(suite_root, "alternatives")
    assert {v["verdict"] for v in r["verdicts"].values()} <= {"holds", "does not hold",
                                                              "inconclusive"}
    assert len(r["verdicts"]) == 3 and (suite_root / "results" / "alternatives_quick.png").exists()
    rows = {row["arm"]: row for row in r["tables"]["accuracy"]}
    budget = sum(len(v) for v in mask_sets(
        suite_root / "arms" / "random99_mask0" / "mask.safetensors").values())
    per_rank = sum(sum(t.shape) for k, t in hf_tensors(SCALES["quick"].model_path()).items()
                   if k.endswith("_proj.weight"))
    rank = max(1, round(budget / per_rank))
    assert rows[f"lora_r{rank}"]["trainable"] == rank * per_rank
    masked = rows[f"masked_lora_r{4 * rank}_d25"]
    assert masked["trainable"] == pytest.approx(0.25 * 4 * rank * per_rank, rel=0.05)
    assert rows["random99_mask0"]["trainable"] == budget
    with open(suite_root / "arms" / "top_entropy20" / "config.yaml") as f:
        assert "top_entropy_quantile: 0.2" in f.read()
    for arm, folder in r["arms"].items():
        assert os.path.exists(os.path.join(folder, "finished.json")), arm


@pytest.mark.parametrize("scale", sorted(SCALES))
def test_every_arm_is_a_valid_grpo_command(scale, tmp_path):
    from sparsejax.cli.grpo import check_args, parse_args
    suite = Suite(SCALES[scale], tmp_path)
    suite._model = SCALES["quick"].model_path()  # a real model folder, whatever the scale
    for settings in ({"sparsity": 0.0}, {"sparsity": 0.9999, "mask_seed": 2},
                     {"mask_path": str(tmp_path / "m.safetensors"), "learning_rate": 1e-3},
                     {"steps": 2, "extra": ("--save-hf-every", "1")},
                     {"sparsity": 0.0, "learning_rate": SCALES[scale].lr_lora,
                      "extra": ("--adapter", "lora", "--lora-rank", "4", "--lora-alpha", "8",
                                "--lora-density", "0.25")},
                     {"sparsity": 0.0, "extra": ("--top-entropy-quantile", "0.2")}):
        flags, lr = suite.arm_flags("arm", **settings)
        args = parse_args(flags)
        assert args.lr == lr
        if "mask_path" not in settings:  # the mask file would be written by the suite
            check_args(args)


def test_learning_rate_grows_with_sparsity_as_the_multiple_ticket_paper():
    paper = SCALES["paper"]
    assert paper.lr(0.99) == pytest.approx(1e-4)
    assert paper.lr(0.999) == pytest.approx(1e-4 * 10 ** (2 / 3))
    assert paper.lr(0.99999) == pytest.approx(1e-2)
    assert paper.lr(0.0) == 1e-6
