"""``python -m sparsejax.lora``: Partial-LoRA ratios of an HF model on a few-shot file.

End to end on the shipped demo model (2 layers, hidden 64) with a few kernels, a small
few-shot set and 5 new tokens: the file it writes is what ``--lora-ratios`` loads
(``sparsejax.lora.load_ratios`` and the scripts' ``--adapter`` flags), its metric is the
toy task's greedy accuracy computed independently, and every ratio is the last grid
point of its own curve that held. Bad input: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from sparsejax import lora
from sparsejax.data import toy_task as tt
from sparsejax.lora import __main__ as cli
from sparsejax.models import load_hf

from paths import REPO

ROOT = REPO
DEMO = ROOT / "sparsejax" / "demo"
FEWSHOT = DEMO / "test.jsonl"
N = 32
ARGS = [str(DEMO), str(FEWSHOT), "--limit", str(N), "--reward", "sparsejax.data.toy_task:reward_fn",
        "--max-new-tokens", "5", "--targets", "q,down", "--step", "0.25",
        "--max-sparsity", "0.75", "--svd-rank", "4", "--no-progress"]


@pytest.fixture(scope="module")
def derived(tmp_path_factory):
    out = tmp_path_factory.mktemp("ratios") / "ratios.json"
    assert cli.main([*ARGS, "-o", str(out)]) == 0
    return out, json.loads(out.read_text())


def _problems() -> list[tt.Problem]:
    rows = [json.loads(line) for line in FEWSHOT.read_text().splitlines()[:N]]
    probs = [tt.Problem(*map(int, r["prompt"].rstrip("=").split("+"))) for r in rows]
    assert [p.answer for p in probs] == [r["answer"] for r in rows]
    return probs


def test_cli_writes_ratios_that_the_trainers_load(derived):
    out, doc = derived
    graphdef, params = nnx.split(load_hf(DEMO))
    paths = lora.select_targets(params, ("q", "down"))
    assert sorted(doc["ratios"]) == sorted(paths) and len(paths) == 4
    # The metric is the toy task's greedy accuracy of the unmasked model.
    base = tt.greedy_accuracy(graphdef, params, tt.build_tokenizer(), _problems(), digits=2,
                              batch_size=N)
    assert doc["baseline"] == pytest.approx(base)
    assert doc["settings"]["fewshot_size"] == N and doc["settings"]["importance"] == "leverage"
    # Each ratio is the last sparsity of its curve above threshold x baseline.
    grid = [0.25, 0.5, 0.75]
    for p, curve in doc["curves"].items():
        held = [s for s, v in curve if v >= 0.9 * doc["baseline"]]
        assert [s for s, _ in curve] == grid[:len(curve)]
        assert doc["ratios"][p] == (held[-1] if held else 0.0)
        if len(curve) < len(grid):
            assert curve[-1][1] < 0.9 * doc["baseline"]
    # A curve point recomputed by hand: that kernel masked at that sparsity.
    p, (s, value) = next((p, c[0]) for p, c in doc["curves"].items())
    w = np.asarray(lora.ratios._flat_kernels(params)[p])
    masked = lora.ratios.masked_weight(w, lora.ratios.masking_order(w, "leverage", 4), s)
    assert (masked == 0).sum() >= math.floor(s * w.size)
    swapped = lora.ratios._replace_kernel(params, p, masked)
    assert tt.greedy_accuracy(graphdef, swapped, tt.build_tokenizer(), _problems(), digits=2,
                              batch_size=N) == pytest.approx(value)
    # --lora-ratios: the library loader and the scripts' flag path accept it.
    loaded = lora.load_ratios(out, params)
    assert loaded.ratios == doc["ratios"]
    from sparsejax.cli.checks import check_ratios_file
    from sparsejax.cli.flags import add_flags, build
    from sparsejax.config import AdapterConfig, TrainableConfig
    from sparsejax.trainable import build_trainable
    parser = argparse.ArgumentParser()
    add_flags(parser, AdapterConfig)
    for adapter in ("partial-lora", "targeted-lora"):
        args = parser.parse_args(["--adapter", adapter, "--lora-rank", "4", "--lora-alpha", "8",
                                  "--lora-targets", "q,down", "--lora-ratios", str(out),
                                  "--lora-seed", "0"])
        config = build(AdapterConfig, args)
        check_ratios_file(config.lora_ratios)
        trainable = build_trainable(TrainableConfig(sparsity=0.0, learning_rate=1e-3), params,
                                    adapter=config)
        dens = lora.densities(trainable.mask, trainable.initial_adapters)
        for k, r in doc["ratios"].items():
            assert dens[k] == pytest.approx(1 - r, abs=0.02), (adapter, k)


@pytest.mark.parametrize("extra,needle", [
    (["--threshold", "1.5"], "--threshold"),
    (["--step", "0"], "--step"),
    (["--importance", "magnitude", "--svd-rank", "0"], "--svd-rank"),
    (["--reward", "no_such_reward"], "--reward"),
    (["--targets", "nothing_like_this"], "nothing_like_this"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, extra, needle):
    code = cli.main([*ARGS, *extra, "-o", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (tmp_path / "r.json").exists()


def test_bad_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1="}\n')
    cases = [([str(tmp_path), str(FEWSHOT)], "cannot load model"),
             ([str(DEMO), str(tmp_path / "missing.jsonl")], "missing.jsonl"),
             ([str(DEMO), str(bad)], "bad.jsonl")]
    for head, needle in cases:
        code = cli.main([*head, *ARGS[2:], "-o", str(tmp_path / "r.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], err


def test_help_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "sparsejax.lora", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--threshold", "--step", "--importance", "--output", "--reward"):
        assert flag in proc.stdout
