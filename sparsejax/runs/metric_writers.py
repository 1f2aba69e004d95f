"""Metric writers: one small interface, and writers for JSONL, TensorBoard and Weights & Biases.

A writer has two methods (the shape of ``clu.metric_writers`` and Tunix's writers)::

    writer.write_scalars(step: int, scalars: Mapping[str, Any]) -> None
    writer.close() -> None

:func:`create_writer` builds one from a ``--report-to`` value such as ``"jsonl,tensorboard"``.

* ``jsonl``: one JSON object per call, ``{"step": step, **scalars}``, appended to
  ``<out_dir>/metrics.jsonl`` and flushed, so a crash loses nothing and a resumed run appends.
  Every JSON-serialisable value is kept (strings, lists), non-finite floats become ``null``.
* ``tensorboard``: event files in ``<out_dir>/tensorboard`` through ``tensorboardX`` (a
  maintained, pure-Python writer of TensorBoard's format: no TensorFlow or torch needed, and it
  is installed with the project; ``clu.metric_writers`` would bring TensorFlow for the same
  files). View with ``tensorboard --logdir <out_dir>/tensorboard``.
* ``wandb``: ``wandb.init(...)`` then ``run.log(scalars, step=step)``; ``wandb`` is optional
  (``pip install -e ".[wandb]"``) and imported only when asked for; missing, it is a one-line
  error. ``WANDB_MODE=offline`` and the other ``WANDB_*`` variables apply as usual.

TensorBoard and W&B get only the numeric values (bools as 0/1); other values are skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["REPORT_TO", "JsonlWriter", "MetricWriter", "MissingDependencyError", "MultiWriter",
           "TensorBoardWriter", "WandbWriter", "check_report_to", "create_writer", "numeric_scalars"]

REPORT_TO = ("jsonl", "tensorboard", "wandb")
"""The writer names :func:`create_writer` knows."""

_PACKAGES = {"tensorboard": ("tensorboardX", 'pip install tensorboardX (installed with sparsejax)'),
             "wandb": ("wandb", 'pip install wandb (or pip install -e ".[wandb]")')}


class MissingDependencyError(ImportError, ValueError):
    """An optional package a flag needs is not installed (an ``ImportError`` and a ``ValueError``)."""


class MetricWriter(Protocol):
    """Writes a step's scalars somewhere; ``close`` flushes and releases it."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def numeric_scalars(scalars: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``scalars`` that are real numbers (bools as 0/1, numpy/jax scalars included)."""
    out = {}
    for key, value in scalars.items():
        if isinstance(value, numbers.Real):
            out[str(key)] = float(value)
        elif getattr(value, "shape", None) == () and hasattr(value, "item"):  # numpy / jax 0-d arrays
            item = value.item()
            if isinstance(item, numbers.Real):
                out[str(key)] = float(item)
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return _json_safe(value.item())
    return value


class JsonlWriter:
    """Appends ``{"step": step, **scalars}`` as one line of JSON to ``path`` per call (flushed)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{str(k): _json_safe(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _import(name: str) -> Any:
    module, hint = _PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"--report-to {name} needs the {module} package: {hint}.") from None


class TensorBoardWriter:
    """Scalars as TensorBoard events in ``logdir`` (``tensorboardX.SummaryWriter.add_scalar``)."""

    def __init__(self, logdir: str | os.PathLike, *, flush_secs: int = 30):
        tensorboardx = _import("tensorboard")
        self.logdir = os.fspath(logdir)
        self._writer = tensorboardx.SummaryWriter(logdir=self.logdir, flush_secs=flush_secs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for tag, value in numeric_scalars(scalars).items():
            self._writer.add_scalar(tag, value, global_step=int(step))

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """Scalars logged to a W&B run (``wandb.init(**init_kwargs)``; ``run.log(scalars, step=step)``).

    Several calls at one step are merged into one W&B step; W&B itself drops (with a warning)
    a step below one already logged in the same run.
    """

    def __init__(self, *, project: str | None = None, name: str | None = None, config: Mapping | None = None,
                 dir: str | os.PathLike | None = None, **init_kwargs: Any):
        wandb = _import("wandb")
        if dir is not None:
            os.makedirs(dir, exist_ok=True)
        self._run = wandb.init(project=project, name=name, config=dict(config or {}),
                               dir=None if dir is None else os.fspath(dir), **init_kwargs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = numeric_scalars(scalars)
        if values:
            self._run.log(values, step=int(step))

    def close(self) -> None:
        self._run.finish()


class MultiWriter:
    """Writes to every writer in turn; ``close`` closes them all (even if one fails)."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def close(self) -> None:
        errors = []
        for writer in self.writers:
            try:
                writer.close()
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]

    def __enter__(self) -> MultiWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_report_to(report_to: str | Sequence[str]) -> tuple[str, ...]:
    """The writer names of a ``--report-to`` value, checked (names known, packages installed).

    ``"jsonl,tensorboard"`` -> ``("jsonl", "tensorboard")``; ``"none"`` or ``""`` -> ``()``.
    Cheap (no import of the packages): call it with the other flag checks, before heavy work.

    Raises:
        ValueError: for an unknown or repeated name; :class:`MissingDependencyError` (also a
            ``ValueError``) for a writer whose package is missing.
    """
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    names = [n.strip().lower() for n in names if n.strip()]
    if names == ["none"]:
        return ()
    for name in names:
        if name not in REPORT_TO:
            raise ValueError(f"--report-to: unknown writer {name!r}; expected a comma-separated list of "
                             f"{', '.join(REPORT_TO)} (or none).")
    if len(set(names)) != len(names):
        raise ValueError(f"--report-to: {','.join(names)} names a writer twice.")
    for name in names:
        if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name][0]) is None:
            module, hint = _PACKAGES[name]
            raise MissingDependencyError(f"--report-to {name} needs the {module} package: {hint}.")
    return tuple(names)


def create_writer(report_to: str | Sequence[str], out_dir: str | os.PathLike, *, run_name: str | None = None,
                  config: Mapping[str, Any] | None = None, wandb_project: str | None = None,
                  jsonl_name: str = "metrics.jsonl") -> MultiWriter:
    """The writers of a ``--report-to`` value, under ``out_dir`` (see the module doc for paths).

    ``run_name`` and ``config`` (the run's flags) go to W&B; ``wandb_project`` defaults to
    ``$WANDB_PROJECT`` or ``"sparsejax"``. In a run of several processes only process 0
    writes metrics: elsewhere the names are checked and an empty writer comes back.
    """
    from sparsejax.parallel import distributed
    out_dir = os.fspath(out_dir)
    writers: list[MetricWriter] = []
    names = check_report_to(report_to)
    if not distributed.is_main():
        return MultiWriter(writers)
    try:
        for name in names:
            if name == "jsonl":
                writers.append(JsonlWriter(os.path.join(out_dir, jsonl_name)))
            elif name == "tensorboard":
                writers.append(TensorBoardWriter(os.path.join(out_dir, "tensorboard")))
            else:
                writers.append(WandbWriter(project=wandb_project or os.environ.get("WANDB_PROJECT", "sparsejax"),
                                           name=run_name, config=config, dir=out_dir))
    except BaseException:
        MultiWriter(writers).close()
        raise
    return MultiWriter(writers)
