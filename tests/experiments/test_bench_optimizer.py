"""experiments/bench_optimizer.py runs end to end and writes its record."""

import json
import subprocess
import sys

from paths import REPO

ROOT = REPO


def test_bench_optimizer_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench_optimizer.py"), "--preset",
         "synthetic-tiny", "--densities", "0.5", "0.1", "--steps", "1", "--warmup", "1",
         "--backends", "xla", "interpret", "--tensors-per-launch", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    for key in ("device", "jax", "date", "commit", "command"):
        assert record[key], key
    methods = {(r["method"], r["backend"], r["density"]) for r in record["results"]}
    assert ("optax.adamw", "xla", 1.0) in methods
    assert ("fused", "interpret", 0.1) in methods
    assert ("fused, compressed, 2/launch", "interpret", 0.5) in methods
    dense = [r for r in record["results"] if r["method"] == "optax.adamw"][0]
    for r in record["results"]:
        assert r["ms"] > 0 and abs(r["speedup"] - dense["ms"] / r["ms"]) < 1e-9
        if r["density"] <= 0.1:  # moments of k entries (plus the k indices) only
            assert r["k"] < r["params"] and r["state_bytes"] < dense["state_bytes"]
    assert "optax.adamw" in run.stdout  # the table
    trainer = [r for r in record["results"] if r["method"].startswith("trainer step")]
    assert {r["density"] for r in trainer} == {0.5, 0.1}
    for r in trainer:  # compile time beside step time, and the same numbers as a plain step
        assert r["compile_s"] > 0 and r["max_abs_diff_vs_plain_step"] <= 1e-6


def test_bench_optimizer_rejects_bad_density():
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_optimizer.py"),
                          "--densities", "1.5"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "densities" in run.stderr


def test_bench_optimizer_guards_smoke(tmp_path):
    """--guards: the three skip guards side by side, each skip bit-exact, the library's
    guard in place."""
    out = tmp_path / "guards.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "bench_optimizer.py"), "--guards",
         "--preset", "synthetic-tiny", "--densities", "0.5", "--dtype", "bfloat16",
         "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    rows = {r["method"]: r for r in record["results"]}
    for kind in ("fused sparse", "dense_adamw"):
        assert rows[f"{kind}: no guard"]["ms_vs_no_guard"] == 1.0
        for guard in ("cond guard (old)", "select guard"):
            r = rows[f"{kind}: {guard}"]
            assert r["skip_bit_exact"] and r["skipped_counted"] and r["compile_s"] > 0
        assert rows[f"{kind}: select guard"]["in_place_fraction"] == 1.0
    assert any(m.startswith("trainer step") for m in rows)
    assert "select guard" in run.stdout
