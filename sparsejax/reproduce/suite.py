"""Arms of the experiments: one GRPO run each, cached and resumable.

An arm is a ``sparsejax grpo`` run in its own folder under the suite's root, in a child
process (so that each arm starts from a clean JAX runtime and a crash costs only that
arm). A finished arm (its ``finished.json``) is read, not rerun; an unfinished one is
continued with ``--resume``, so a killed suite continues where it stopped and arms that
several experiments share (the full-finetuning run) run once.

``seed`` shifts every seed of the suite (the data order and sampling of each arm, and the
mask seeds), so that an independent rerun with other seeds is one flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from sparsejax.reproduce.scales import Scale


class SuiteError(RuntimeError):
    """An arm failed (the message names it and where its output is)."""


@dataclasses.dataclass
class ArmResult:
    """What a finished arm left: its folder, flags, metrics and final evaluation."""

    name: str
    out_dir: str
    sparsity: float
    learning_rate: float
    flags: list[str]
    records: list[dict[str, Any]]
    final_eval: dict[str, Any]

    @property
    def accuracy(self) -> float:
        """Accuracy of the final evaluation."""
        return float(self.final_eval["eval_accuracy"])

    @property
    def eval_examples(self) -> int:
        return int(self.final_eval.get("eval_examples", 0))

    def curve(self) -> list[tuple[int, float]]:
        """``(step, eval accuracy)`` of every evaluation, the final one included."""
        points = {int(r["step"]): float(r["eval_accuracy"]) for r in self.records
                  if r.get("kind") == "eval"}
        return sorted(points.items())

    def step_time(self, skip: int = 2) -> float:
        """Median whole-step time of the train steps after the first ``skip`` (which
        compile)."""
        times = sorted(float(r["step_time"]) for r in self.records
                       if r.get("kind") == "train" and int(r["step"]) >= skip)
        return times[len(times) // 2] if times else float("nan")

    @property
    def final_model(self) -> str:
        return os.path.join(self.out_dir, "final_model")

    @property
    def mask_file(self) -> str:
        return os.path.join(self.out_dir, "mask.safetensors")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _first_difference(before: list[str], now: list[str]) -> str:
    for i, (a, b) in enumerate(zip(before, now)):
        if a != b:
            flag = before[i - 1] if i and before[i - 1].startswith("--") else ""
            return f"{flag} {a} then, {b} now".strip()
    return f"{len(before)} flags then, {len(now)} now"


class Suite:
    """Runs and reads the arms of one scale under ``root``.

    Args:
        scale: the :class:`~sparsejax.reproduce.scales.Scale`.
        root: the suite's folder (arms in ``root/arms``, derived masks in ``root/masks``).
        seed: added to every seed (data order, sampling, masks).
        quiet: hide the arms' progress bars and output (their logs are kept).
    """

    def __init__(self, scale: Scale, root: str | os.PathLike, *, seed: int = 0,
                 quiet: bool = False):
        self.scale, self.root, self.seed, self.quiet = scale, os.fspath(root), seed, quiet
        self._model: str | None = None
        self.ran: list[str] = []  # arms this suite ran (not read from the cache)

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.scale.model_path()
        return self._model

    def path(self, *parts: str) -> str:
        out = os.path.join(self.root, *parts)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        return out

    def arm_flags(self, name: str, *, sparsity: float = 0.0, mask_seed: int = 0,
                  mask_path: str | None = None, seed: int = 0,
                  learning_rate: float | None = None, steps: int | None = None,
                  extra: Sequence[str] = ()) -> tuple[list[str], float]:
        """The ``sparsejax grpo`` flags of an arm and its learning rate."""
        lr = float(f"{self.scale.lr(sparsity) if learning_rate is None else learning_rate:.6g}")
        flags = self.scale.arm_flags(self.model)
        if steps is not None:
            flags += ["--steps", str(steps)]  # the later flag wins
        flags += ["--seed", str(self.seed + seed), "--lr", repr(lr),
                  "--out-dir", os.path.join(self.root, "arms", name), *extra]
        if mask_path is not None:
            flags += ["--mask-path", mask_path]
        else:
            flags += ["--sparsity", str(sparsity), "--mask-seed", str(self.seed + mask_seed)]
        return flags, lr

    def arm(self, name: str, **settings: Any) -> ArmResult:
        """The finished arm ``name`` (run or continued first unless finished); settings
        as :meth:`arm_flags` takes them."""
        flags, lr = self.arm_flags(name, **settings)
        out_dir = os.path.join(self.root, "arms", name)
        recorded = os.path.join(out_dir, "arm.json")
        if os.path.exists(recorded):
            with open(recorded) as f:
                before = json.load(f)["flags"]
            if before != flags:
                raise SuiteError(
                    f"arm {name} in {out_dir} was run with other settings "
                    f"({_first_difference(before, flags)}); remove that folder or choose "
                    "another --root")
        else:
            os.makedirs(out_dir, exist_ok=True)
            with open(recorded, "w") as f:
                json.dump({"flags": flags}, f, indent=1)
        if not os.path.exists(os.path.join(out_dir, "finished.json")):
            self._run(name, flags, out_dir)
        records = _read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
        with open(os.path.join(out_dir, "final_eval.json")) as f:
            final = json.load(f)
        sparsity = 0.0 if settings.get("mask_path") else float(settings.get("sparsity", 0.0))
        return ArmResult(name, out_dir, sparsity, lr, flags, records, final)

    def _run(self, name: str, flags: list[str], out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        log = os.path.join(out_dir, "arm.log")
        command = [sys.executable, "-m", "sparsejax.cli.main", "grpo", *flags, "--resume"]
        if self.quiet:
            command.append("--no-progress")
        print(f"arm {name}: running (log {log})", file=sys.stderr, flush=True)
        with open(log, "a") as f:
            f.write(" ".join(command) + "\n")
            f.flush()
            out = subprocess.run(command, stdout=f, stderr=f if self.quiet else None)
        if out.returncode != 0:
            raise SuiteError(f"arm {name} failed (exit {out.returncode}); see {log} (and the "
                             "output above); rerunning the same command continues it")
        self.ran.append(name)
