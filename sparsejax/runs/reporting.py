"""Run outputs: a JSONL metrics log, a progress bar, curves as PNG."""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


def to_python(value: Any) -> Any:
    """JSON-safe scalars from jax/numpy values (non-finite floats become None)."""
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if hasattr(value, "item") and np.size(value) == 1:
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON object per line to ``path``, each line whole (one write, flush
    and fsync), so a crash or a full disk leaves at most one torn last line.

    A new run starts the file afresh. A run resumed from the checkpoint taken after
    ``resume_step`` steps keeps what was logged up to that checkpoint (train records of
    steps ``< resume_step``, evaluations at ``<= resume_step``, except the final
    evaluation at ``final_step``, which the resumed run redoes) and drops the rest; a
    torn last line is dropped, and said.

    ``writer`` (optional, a :class:`sparsejax.runs.metric_writers.MetricWriter` such as the
    TensorBoard or W&B writer of ``--report-to``) receives every train and eval record
    as ``writer.write_scalars(record["step"], record)`` right after its line is written
    (the writer keeps the numeric values); ``kind: config`` records stay in the file
    only. The log never closes the writer: its creator does. The file stays the run's
    own record (plots and resumes read it); a resumed run's writer sees the steps after
    the checkpoint again.

    In a run of several processes only process 0 (:func:`sparsejax.parallel.distributed.is_main`)
    touches the file and the writer; on the others the log does nothing.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None,
                 final_step: int | None = None, writer: Any = None):
        from sparsejax.parallel import distributed
        self.path = os.fspath(path)
        self.writer = writer
        self.active = distributed.is_main()
        if not self.active:
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if not os.path.exists(self.path):
            return
        if resume_step is None:
            os.remove(self.path)
            return
        rows = read_metrics(self.path)
        keep_evals = final_step is None or resume_step < final_step
        kept = [r for r in rows if r.get("step", -1) < resume_step
                or (keep_evals and r.get("kind") != "train"
                    and r.get("step", -1) == resume_step)]
        from sparsejax.runs import run_dir
        run_dir.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.active:
            return
        from sparsejax.runs import run_dir
        line = json.dumps(to_python(record)) + "\n"
        with run_dir.disk_errors(self.path):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        if self.writer is not None and record.get("kind") != "config":
            self.writer.write_scalars(int(record.get("step", 0)),
                                      {k: v for k, v in record.items()
                                       if k not in ("kind", "step")})


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics log; a torn (unparsable) last line is dropped, and said.

    Raises:
        ValueError: naming the file and line of an earlier line that is not JSON.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    numbered = [(i, l) for i, l in enumerate(lines, start=1) if l.strip()]
    for n, (number, line) in enumerate(numbered):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(numbered) - 1:
                print(f"{path}:{number}: dropped a torn last line (an interrupted write)",
                      file=sys.stderr)
                break
            raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from err
    return rows


def write_json(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(to_python(record), f, indent=2)


_COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                             "/jax/core/compile/jaxpr_to_mlir_module_duration",
                             "/jax/core/compile/backend_compile_duration"})
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compile_total = [0.0]
_compile_count = [0]
_listening = [False]


def _on_duration(event: str, seconds: float, **_: Any) -> None:
    if event in _COMPILE_EVENTS:
        _compile_total[0] += seconds
    if event == _BACKEND_COMPILE:
        _compile_count[0] += 1


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling jitted functions
    since the first call (from JAX's own monitoring events). A step's compile time is
    the difference across it, so throughput can be reported without it."""
    if not _listening[0]:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening[0] = True
    return _compile_total[0]


def compile_count() -> int:
    """XLA programs this process has built (compiled, or read back from JAX's persistent
    compilation cache) since the first call of this or :func:`compile_seconds`; a
    program already in memory is reused and not counted."""
    compile_seconds()
    return _compile_count[0]


def peak_memory_bytes() -> int | None:
    """Peak memory: the device's where the backend reports it (GPU), else the process's
    peak resident set (a CPU run's arrays live there); None where neither is known."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:
        stats = None
    if stats:
        return stats.get("peak_bytes_in_use")
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def release_host_memory() -> None:
    """Hands the host memory that freed arrays left in the C allocator's heap back to
    the system (glibc's ``malloc_trim``; nothing elsewhere). Without it a CPU run keeps
    the high-water mark of its last step resident, and a checkpoint save on top of it
    can exceed the machine's memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                title: str = "", keys: Sequence[str] = ("reward_mean", "accuracy"),
                eval_key: str = "eval_accuracy") -> str:
    """Training curves (one panel per key, eval points overlaid) written to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r["step"] for r in train if r.get(key) is not None]
        ys = [r[key] for r in train if r.get(key) is not None]
        ax.plot(xs, ys, label=f"train {key}")
        if key == "accuracy" and evals:
            ax.plot([r["step"] for r in evals], [r[eval_key] for r in evals], "o-",
                    label="eval accuracy")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)
