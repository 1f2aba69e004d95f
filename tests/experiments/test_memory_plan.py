"""Smoke test of experiments/memory_plan.py at a tiny preset (real subprocesses: the
script sets XLA flags before jax starts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paths import REPO

SCRIPT = REPO / "experiments" / "memory_plan.py"
TINY = ["--preset", "tiny", "--num-layers", "4", "--micro-batch-size", "2",
        "--prompt-length", "16", "--completion-length", "112", "--generation-batch-size", "4",
        "--prompts-per-step", "2", "--num-generations", "2", "--attention-chunk-size", "32"]


def _run(args, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TOTAL (peak)" in proc.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    full = _run(TINY, folder / "layer.json")
    none = _run(TINY + ["--remat", "none", "--no-dense", "--no-sampler"], folder / "none.json")
    return full, none


def test_plan_parts_and_phases(plans):
    record, _ = plans
    for key in ("device", "versions", "date", "commit", "command", "fits"):
        assert record[key]
    sparse, dense = record["plans"]["sparse 0.99"], record["plans"]["dense AdamW"]
    for plan in (sparse, dense):
        assert plan["total"] == max(plan["peak_sampling"], plan["peak_gradient"],
                                    plan["peak_step"])
        assert plan["total"] >= plan["params"] + plan["optimizer_state"]
        assert plan["activations_temporaries"] > 0 and plan["sampler_temporaries"] > 0
    assert sparse["params"] == dense["params"]
    # Compressed state and accumulator: a few % of the dense ones.
    assert sparse["optimizer_state"] < dense["optimizer_state"] / 10
    assert sparse["gradient_accumulator"] < dense["gradient_accumulator"] / 20
    assert sparse["total"] < dense["total"]
    # KV cache of the tiny config (2 x layers x kv_heads 2 x head_dim 16 x bf16 per token):
    # 4 decode slots of 112 generated tokens and 2 prefilled prompts of 16, each in whole
    # attention chunks of 256 positions.
    assert sparse["kv_cache"] == 2 * 4 * 2 * 16 * 2 * (4 * 256 + 2 * 256)


def test_remat_lowers_the_planned_activations(plans):
    layer, none = plans
    a_layer = layer["plans"]["sparse 0.99"]["activations_temporaries"]
    a_none = none["plans"]["sparse 0.99"]["activations_temporaries"]
    assert a_layer < 0.8 * a_none, (a_layer, a_none)


def test_bad_flags_fail_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--sparsity", "1.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--sparsity" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "--micro-batch-size", "3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--micro-batch-size" in proc.stderr
