"""An experiment's outcome as files a reader trusts: JSON with where it came from, a
markdown table per table, and plots (accuracy over steps per arm; accuracy against
sparsity)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
from typing import Any

from sparsejax.reproduce.experiments import Outcome
from sparsejax.reproduce.scales import Scale

NESTED = ("by_layer", "by_type")  # per-group lists: in the JSON, not in the markdown


def provenance(scale: Scale, model: str, seed: int, argv: list[str]) -> dict[str, Any]:
    """Model, task, scale, seeds, commit, versions, date and the command of a result."""
    import importlib.metadata as md

    from sparsejax.runs.provenance import git_commit
    versions = {"python": platform.python_version()}
    for name in ("jax", "flax", "optax", "transformers", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return {"scale": dataclasses.asdict(scale), "model": model, "seed": seed,
            "commit": git_commit(short=True), "versions": versions,
            "date": datetime.date.today().isoformat(),
            "command": shlex.join([os.path.basename(sys.executable), "-m",
                                   "sparsejax.reproduce", *argv])}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` (the union of their keys, in first-seen order)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and k not in NESTED]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def markdown(outcome: Outcome, info: dict[str, Any]) -> str:
    """The outcome as a markdown page: verdicts first, then the tables."""
    lines = [f"# {outcome.experiment} ({info['scale']['name']} scale)", "",
             f"Model `{info['model']}`, seed {info['seed']}, commit {info['commit']}, "
             f"{info['date']}; `{info['command']}`.", "", "| claim | verdict | evidence |",
             "|---|---|---|"]
    lines += [f"| {claim} | **{v['verdict']}** | {v['evidence']} |"
              for claim, v in outcome.verdicts.items()]
    for name, rows in outcome.tables.items():
        lines += ["", f"## {name}", "", markdown_table(rows)]
    return "\n".join(lines) + "\n"


def plot(outcome: Outcome, path: str) -> None:
    """Accuracy over steps of every arm; beside it, final accuracy against sparsity."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    arms = list(dict.fromkeys([*outcome.curves, *(r.get("arm") for r in
                                                  outcome.tables.get("accuracy", []))]))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {arm: cycle[i % len(cycle)] for i, arm in enumerate(arms)}  # one per arm
    for arm, curve in outcome.curves.items():
        if curve:
            left.plot(*zip(*curve), marker="o", label=arm, color=color[arm])
    left.set(xlabel="step", ylabel="eval accuracy", title=outcome.experiment)
    left.legend(fontsize=7)
    points = [(r["sparsity"], r["final_accuracy"], r["arm"])
              for r in outcome.tables.get("accuracy", []) if "sparsity" in r]
    for sparsity, accuracy, arm in points:
        density = max(1 - sparsity, 1e-6)
        right.scatter(density, accuracy, color=color[arm])
        right.annotate(arm, (density, accuracy), fontsize=7)
    right.set(xscale="log", xlabel="trained fraction (1 = full finetuning)",
              ylabel="final eval accuracy", title="accuracy vs trained fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(outcome: Outcome, info: dict[str, Any], folder: str) -> dict[str, str]:
    """Writes ``<experiment>_<scale>.{json,md,png}`` into ``folder``; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{outcome.experiment}_{info['scale']['name']}")
    paths = {"json": stem + ".json", "md": stem + ".md", "png": stem + ".png"}
    with open(paths["json"], "w") as f:
        json.dump({**info, **dataclasses.asdict(outcome)}, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(outcome, info))
    plot(outcome, paths["png"])
    return paths
