"""experiments/bench_train_step.py runs end to end (tiny preset) and writes its record."""

import json
import subprocess
import sys

from paths import REPO

ROOT = REPO
SCRIPT = ROOT / "experiments" / "bench_train_step.py"


def test_bench_train_step_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--num-layers", "0", "--vocab", "0",
         "--length", "12", "--batch", "2", "--densities", "0.1", "--steps", "1",
         "--warmup", "0", "--backend", "xla", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    for key in ("device", "jax", "date", "commit", "command", "model"):
        assert record[key], key
    rows = {(r["method"], r["density"]): r for r in record["results"]}
    assert set(rows) == {("dense", 1.0), ("gather", 0.1), ("sparse", 0.1)}
    # Same data, same start: the three losses agree; the sparse rows train k < N entries.
    losses = [r["loss"] for r in rows.values()]
    assert max(losses) - min(losses) <= 1e-5 * max(abs(x) for x in losses)
    assert rows["sparse", 0.1]["k"] == rows["gather", 0.1]["k"] < rows["dense", 1.0]["k"]
    for r in rows.values():
        assert r["ms"] > 0 and r["peak_bytes"] > 0
        assert abs(r["speedup_vs_dense"] - rows["dense", 1.0]["ms"] / r["ms"]) < 1e-9
    assert "vs gather" in run.stdout


def test_bench_train_step_rejects_bad_density():
    run = subprocess.run([sys.executable, str(SCRIPT), "--densities", "1.5"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "densities" in run.stderr
