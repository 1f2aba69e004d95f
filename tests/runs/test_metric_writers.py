"""Metric writers: JSONL, TensorBoard (round trip through TensorBoard's own reader), W&B (fake module)."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest

from sparsejax.runs.metric_writers import (
    JsonlWriter,
    MissingDependencyError,
    check_report_to,
    create_writer,
    numeric_scalars,
)


def _random_records(seed=0, steps=5):
    rng = np.random.default_rng(seed)
    return [(step, {"loss": float(rng.normal()), "reward_mean": float(rng.uniform()),
                    "accuracy": np.float32(rng.uniform()), "kind": "train", "samples": ["a", "b"],
                    "skipped": bool(rng.integers(2))}) for step in range(0, 3 * steps, 3)]


def test_numeric_scalars():
    got = numeric_scalars({"a": 1, "b": np.float32(0.5), "c": "x", "d": True, "e": [1], "f": np.array(2.0)})
    assert got == {"a": 1.0, "b": 0.5, "d": 1.0, "f": 2.0}


def test_jsonl_appends_and_flushes(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    writer = JsonlWriter(path)
    writer.write_scalars(0, {"loss": 1.5, "kind": "train", "bad": math.nan, "x": np.float32(2.0)})
    assert json.loads(path.read_text()) == {"step": 0, "loss": 1.5, "kind": "train", "bad": None, "x": 2.0}
    writer.close()
    writer = JsonlWriter(path)  # a resumed run appends
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]


def test_tensorboard_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _random_records()
    writer = create_writer("jsonl,tensorboard", tmp_path)
    for step, scalars in records:
        writer.write_scalars(step, scalars)
    writer.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "reward_mean", "accuracy", "skipped"}
    for tag in ("loss", "reward_mean", "accuracy", "skipped"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(step, float(scalars[tag])) for step, scalars in records]
        assert [s for s, _ in got] == [s for s, _ in expected]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)  # float32 events
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [r["loss"] for _, r in records]


class _FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


@pytest.fixture()
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        run = _FakeRun(**kwargs)
        module.runs.append(run)
        return run

    module.init = init
    module.__spec__ = types.SimpleNamespace(name="wandb")  # found by importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_writer_against_a_fake_module(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    records = _random_records(seed=1, steps=3)
    writer = create_writer("wandb", tmp_path, run_name="run1", config={"lr": 1e-4})
    for step, scalars in records:
        writer.write_scalars(step, scalars)
    writer.write_scalars(9, {"kind": "eval"})  # nothing numeric: nothing logged
    writer.close()
    (run,) = fake_wandb.runs
    assert run.init_kwargs == {"project": "proj", "name": "run1", "config": {"lr": 1e-4}, "dir": str(tmp_path)}
    assert run.logged == [(step, numeric_scalars(s)) for step, s in records]
    assert run.finished


def test_report_to_checks(monkeypatch):
    assert check_report_to("jsonl, TensorBoard") == ("jsonl", "tensorboard")
    assert check_report_to("none") == ()
    assert check_report_to(["jsonl"]) == ("jsonl",)
    with pytest.raises(ValueError, match="unknown writer 'tensorbored'"):
        check_report_to("jsonl,tensorbored")
    with pytest.raises(ValueError, match="twice"):
        check_report_to("jsonl,jsonl")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as when not installed
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(MissingDependencyError,
                       match=r"--report-to wandb needs the wandb package: pip install wandb") as err:
        check_report_to("jsonl,wandb")
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    with pytest.raises(ImportError, match="needs the wandb package"):
        create_writer("wandb", "/nonexistent-dir-never-created")
