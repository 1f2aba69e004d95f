"""experiments/gpu_check.py: the --tiny run, part isolation, the package check, the model.

The end-to-end test runs ``--tiny --in-process`` over the parts that drive this
library directly (env, tests, optimizer, grpo); the ``sampler`` and ``train_step`` parts
run other scripts that have smoke tests of their own, so here only their wiring (the
flags gpu_check passes exist in their --help) is checked. The isolation test runs real
child processes with a hanging part and a failing one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from paths import REPO

ROOT = REPO
SCRIPT = ROOT / "experiments" / "gpu_check.py"

import gpu_check  # noqa: E402
import gpu_check_parts as parts  # noqa: E402


def run(args, env=None, timeout=600):
    env = {**{k: v for k, v in os.environ.items() if k != gpu_check.HOOK}, **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = run(["--tiny", "--in-process", "--only", "env,tests,optimizer,grpo",
                "--out", str(out)])
    return proc, out


def test_tiny_run_reports_every_selected_part(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    for key in ("date", "commit", "command", "device", "versions"):
        assert record[key], key
    assert record["versions"]["jax"] and record["device"]["platform"] == "cpu"
    status = {r["part"]: r["status"] for r in record["parts"]}
    assert status == {"env": "ok", "tests": "skipped", "optimizer": "ok",
                      "grpo:sparse": "ok", "grpo:full": "ok"}
    by = {r["part"]: r for r in record["parts"]}
    # the gpu tests were collected (files import) and skipped for want of a GPU, said so
    assert by["tests"]["tests"] > 0 and by["tests"]["skipped"] == by["tests"]["tests"]
    assert "needs a GPU" in by["tests"]["summary"]
    assert "test_cudnn_attention.py" in by["tests"]["files"]
    assert any("pallas needs a GPU" in n for n in by["optimizer"]["notes"])
    methods = {(r["backend"], r["method"]) for r in by["optimizer"]["rows"]}
    assert methods == {("xla", "optax.adamw"), ("xla", "fused"), ("interpret", "fused"),
                       ("interpret", "fused, 2/launch")}
    for r in by["optimizer"]["rows"]:
        assert r["ms"] > 0 and r["gbps"] > 0 and "error" not in r
    for variant, trainable_below_all in (("sparse", True), ("full", False)):
        rec = by[f"grpo:{variant}"]
        assert [r["step"] for r in rec["rows"]] == [0, 1]
        for r in rec["rows"]:
            for phase in ("generation", "reference", "backward", "optimizer"):
                assert r[f"{phase}_s"] > 0, (variant, phase)
            assert r["step_s"] >= r["generation_s"] + r["backward_s"]
        assert (rec["trainable"] < by["grpo:full"]["trainable"]) == trainable_below_all
    md = (out / "gpu_check.md").read_text()
    assert "| part | status |" in md and "## GRPO step" in md and "## optimizer step" in md
    # the table is also printed at the end, with one progress line per part before it
    assert proc.stdout.count("running (timeout") == 5 and "| grpo:full | ok |" in proc.stdout


def test_hang_and_failure_do_not_stop_the_others(tmp_path):
    t0 = time.perf_counter()
    proc = run(["--tiny", "--only", "tests,optimizer,grpo", "--timeout", "tests=4",
                "--out", str(tmp_path)],
               env={gpu_check.HOOK: "tests:hang,optimizer:fail,grpo:fail"}, timeout=300)
    assert time.perf_counter() - t0 < 200
    assert proc.returncode == 1, proc.stderr[-2000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {r["part"]: r["status"] for r in record["parts"]}
    assert status == {"tests": "timeout", "optimizer": "failed", "grpo:sparse": "failed",
                      "grpo:full": "failed"}
    by = {r["part"]: r for r in record["parts"]}
    assert by["tests"]["seconds"] < 30 and "killed after 4 s" in by["tests"]["summary"]
    assert "injected" in by["optimizer"]["summary"]
    assert "FAILED: tests, optimizer" in proc.stdout


def test_missing_packages_are_named_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(gpu_check, "REQUIRED",
                        {"numpy": "numpy", "no_such_module_xyz": "no-such-package"})
    out = tmp_path / "out"
    assert gpu_check.main(["--tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing packages: no-such-package" in err and "numpy" not in err
    assert not out.exists()
    assert gpu_check.missing_packages({"numpy": "numpy"}) == []


@pytest.mark.parametrize("argv,match", [(["--only", "env,nope"], "--only"),
                                        (["--timeout", "env=x"], "--timeout"),
                                        (["--budget-s", "0"], "--budget-s"),
                                        (["--in-process"], "--in-process")])
def test_bad_flags_are_one_line_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_sector_model_matches_a_monte_carlo_count():
    rng = np.random.default_rng(0)
    for n, k, itemsize in ((1_000_000, 10_000, 2), (1_000_000, 1_000, 2),
                           (200_000, 50_000, 4), (50_000, 50_000, 4)):
        idx = np.sort(rng.choice(n, k, replace=False))
        counted = len(np.unique(idx // (32 // itemsize))) / k
        assert abs(parts.sectors_per_entry(n, k, itemsize) - counted) <= 0.01 * counted + 1e-3
    # kernels/README.md: ~0.93 sectors per entry for bf16 at 1%, ~0.99 at 0.1%
    assert round(parts.sectors_per_entry(10**8, 10**6, 2), 2) == 0.93
    assert round(parts.sectors_per_entry(10**8, 10**5, 2), 2) == 0.99
    # README's per-entry total for bf16 params + f32 master, dense bf16 grad: ~88 B
    per_entry = parts.sector_model_bytes([(10**8,)], [10**5], param_itemsize=2,
                                         grad_itemsize=2, master=True, compressed=False) / 1e5
    assert 28 + 2 * 32 * 0.98 <= per_entry <= 28 + 2 * 32


def test_script_wiring_flags_exist():
    """The flags gpu_check needs of the scripts it drives are in their --help."""
    sampler = parts.script_flags(ROOT / "experiments" / "bench_sampler.py")
    assert {"--out", "--tiny", "--no-hf"} <= sampler
    assert {"--model", "--preset"} & sampler
    train = parts.script_flags(ROOT / "experiments" / "bench_train_step.py")
    assert {"--out", "--preset", "--densities", "--num-layers", "--dtype"} <= train
    step = parts.script_flags(ROOT / "experiments" / "bench_grpo_step.py")
    assert {"--out", "--tiny", "--arms", "--random-preset", "--dtype", "--steps",
            "--no-skip"} <= step


def test_gpu_test_files_are_found_statically():
    names = {p.name for p in parts.gpu_test_files()}
    assert {"test_kernels.py", "test_sampled_matmul.py", "test_cudnn_attention.py"} <= names
    assert "test_gpu_check.py" not in names
