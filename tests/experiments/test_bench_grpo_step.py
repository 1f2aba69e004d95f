"""experiments/bench_grpo_step.py runs end to end (TRL, sparse, full; and the rollouts
against transformers' generate) on the shipped demo model and writes its record."""

import json
import os
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
        if name in ("sparse", "full"):  # the first step builds its programs
            assert arm["compiles_first"] > 0 and arm["compiles_later"] >= 0
        assert arm["completion_tokens_per_s"] == pytest.approx(sum(tokens) / sum(steps))
        if name != baseline:
            assert arm[f"ratio_to_{baseline}"] == pytest.approx(
                arm["completion_tokens_per_s"] / arms[baseline]["completion_tokens_per_s"])


def test_random_preset_runs_a_preset_shaped_model(tmp_path, monkeypatch):
    """``--random-preset`` (the GPU check's model): random weights in the preset's shape,
    written with the demo tokenizer, train in the sparsejax arms; unknown presets are a
    one-line error."""
    import bench_grpo_step

    from sparsejax.models import config as model_config
    from sparsejax.models import load_hf

    tiny = model_config.DecoderConfig(
        model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
    monkeypatch.setitem(model_config.PRESETS, "tiny-test", tiny)
    for name in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE"):  # main() sets them
        monkeypatch.setenv(name, os.environ.get(name, ""))
    with pytest.raises(SystemExit):
        bench_grpo_step.parse_args(["--random-preset", "no-such-preset"])
    args = bench_grpo_step.parse_args(["--random-preset", "tiny-test", "--steps", "2"])
    model_dir, prompts, _, _ = bench_grpo_step.load_task(args, str(tmp_path))
    assert load_hf(model_dir).config.replace(param_dtype="float32") == tiny.replace(
        param_dtype="float32")
    assert len(prompts) >= 16
    out = tmp_path / "bench.json"
    assert bench_grpo_step.main(
        ["--random-preset", "tiny-test", "--arms", "sparse,full", "--prompts", "2",
         "--generations", "2", "--max-new-tokens", "4", "--micro-batch", "4",
         "--steps", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["arms"]) == {"sparse", "full"}
    assert record["settings"]["model_dir"] == "random weights, tiny-test's shape"
    assert all(a["completion_tokens_per_s"] > 0 for a in record["arms"].values())
