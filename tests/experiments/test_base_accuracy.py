"""experiments/base_accuracy.py on the shipped demo model: the JSON it writes, and bad flags."""

import json

import base_accuracy
import pytest

from paths import REPO

DEMO = str(REPO / "sparsejax" / "demo")


def test_writes_the_measurement(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEJAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    assert base_accuracy.main(["--model", DEMO, "--task", "arithmetic", "--limit", "6",
                               "--max-new-tokens", "3", "--batch-size", "4", "--no-progress",
                               "--note", "demo", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["task"], r["n"], r["max_new_tokens"], r["note"]) == ("arithmetic", 6, 3, "demo")
    assert r["correct"] == round(r["accuracy"] * 6) and 0 <= r["accuracy"] <= 1
    assert sum(v["n"] for v in r["per_template"].values()) == 6
    assert len(r["samples"]) == 6 and r["instruction"] == "Answer with a single number."
    assert {"jax", "transformers"} <= set(r["versions"]) and r["command"].startswith("python ")
    assert "greedy accuracy" in capsys.readouterr().out


def test_bad_flags_exit_2(tmp_path, capsys):
    for argv in (["--model", str(tmp_path)], ["--model", DEMO, "--limit", "0"],
                 ["--model", DEMO, "--out", str(tmp_path / "no" / "r.json")]):
        with pytest.raises(SystemExit) as e:
            base_accuracy.main(argv)
        assert e.value.code == 2
    assert "no config.json" in capsys.readouterr().err
