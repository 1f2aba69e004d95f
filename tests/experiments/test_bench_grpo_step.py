"""experiments/bench_grpo_step.py runs end to end (TRL, sparse, full; and the rollouts
against transformers' generate) on the shipped demo model and writes its record."""

import json
import subprocess
import sys

import pytest

from paths import REPO


@pytest.mark.parametrize("mode", [[], ["--rollouts"]])
def test_bench_grpo_step_tiny(tmp_path, mode):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "bench_grpo_step.py"), "--tiny", *mode,
         "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text())
    for key in ("device", "versions", "date", "commit", "command"):
        assert record[key], key
    arms = record["arms"]
    baseline = "generate" if mode else "trl"
    assert set(arms) == ({"generate", "rollout"} if mode else {"trl", "sparse", "full"})
    for name, arm in arms.items():
        steps = arm["raw"]["step_s"][1:]
        tokens = arm["raw"]["completion_tokens"][1:]
        assert all(s > 0 for s in steps) and all(t > 0 for t in tokens)
        if name in ("sparse", "full", "rollout"):  # every step samples its own prompts
            assert all(s > 0 for s in arm["raw"]["sample_s"]), arm["raw"]
        assert arm["completion_tokens_per_s"] == pytest.approx(sum(tokens) / sum(steps))
        if name != baseline:
            assert arm[f"ratio_to_{baseline}"] == pytest.approx(
                arm["completion_tokens_per_s"] / arms[baseline]["completion_tokens_per_s"])
