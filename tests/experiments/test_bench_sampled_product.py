"""experiments/bench_sampled_product.py runs end to end (few tokens) and writes its record."""

import json
import subprocess
import sys

from paths import REPO

ROOT = REPO
SCRIPT = ROOT / "experiments" / "bench_sampled_product.py"


def test_bench_sampled_product_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--tokens", "8", "--repeats", "1",
                          "--density", "0.001", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    for key in ("device", "jax", "date", "commit", "command"):
        assert record[key], key
    assert len(record["results"]) == 5
    for r in record["results"]:
        assert {"dense", "xla"} <= set(r["ms"]) and all(v > 0 for v in r["ms"].values())
        assert r["k"] == max(1, int(0.001 * r["in"] * r["out"]))
        # every implementation agrees with the XLA one (the check can fail: it compares)
        assert r["max_rel_err"] and all(e <= 1e-5 for e in r["max_rel_err"].values()), r
    assert "tied output" in run.stdout


def test_bench_sampled_product_rejects_bad_density():
    run = subprocess.run([sys.executable, str(SCRIPT), "--density", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "density" in run.stderr
