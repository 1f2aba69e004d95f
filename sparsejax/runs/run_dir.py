"""One run = one output folder: its lock, its earlier outputs, its identity, its end.

A run holds an exclusive ``flock`` on ``<out_dir>/.lock`` while it runs (the kernel
drops it when the process dies, so a stale lock of a dead process never blocks; the
file keeps the holder's pid only for the error message). A run of several processes
(:mod:`sparsejax.parallel.distributed`) sharing one folder takes one lock per process:
``.lock`` for process 0 (so a one-process run and a many-process run exclude each
other), ``.lock.<i>`` for process ``i``. Process 0 alone removes an earlier run's
outputs and writes or clears ``finished.json``; every process takes the same decisions. A new run refuses a folder
that holds any earlier run's outputs unless it resumes or overwrites them. The run's
identity (the settings a resume must not change) is stored in every checkpoint's
manifest and compared on resume. ``finished.json`` is written last, after the final
model, so a run without it is not finished and ``--resume`` completes it.

Every write that can meet a full disk goes through :func:`disk_errors`, which turns
"no space left" (at any depth of an exception chain, also from tensorstore or
safetensors) into one :class:`DiskFullError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from sparsejax.parallel import distributed

OUTPUTS = ("metrics.jsonl", "checkpoints", "final_eval.json", "final_model", "curves.png",
           "finished.json", "tensorboard", "wandb")  # the last two: --report-to writers
FINISHED = "finished.json"
LOCK = ".lock"

# Settings a resume may change; everything else in the identity must match.
RESUMABLE = frozenset({
    "steps", "eval_every", "eval_on_start", "eval_limit", "eval_temperature", "eval_batch_size",
    "eval_max_new_tokens", "save_every", "save_hf_every", "keep_checkpoints", "generation_batch_size",
    "micro_batch_size", "logprob_chunk_size", "backend", "progress",
    "mesh", "coordinator_address", "num_processes", "process_id"})  # a resume may reshard

# Config field -> command-line flag, where the two names differ.
FLAG_NAMES = {"learning_rate": "--lr", "sparse.learning_rate": "--lr",
              "mask": "the mask's entries", "model_shapes": "the model's shapes",
              "trainable": "the number of trainable entries", "data": "the training data",
              "trainer": "the trainer"}


class RunError(Exception):
    """A run cannot go on (lock held, disk full, no intact checkpoint): one line."""


class DiskFullError(RunError):
    """The disk filled while writing ``path``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        super().__init__(f"no space left on device writing {self.path}")


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` or an exception in its chain is "no space left" (or quota)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raises any error caused by a full disk as :class:`DiskFullError` (``path``)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(path) from None
        raise


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` whole or not at all (temp file, fsync, rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    with disk_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        fsync_dir(folder)


def write_json_atomic(path: str | os.PathLike, record: Any) -> None:
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary folder beside ``path`` that replaces ``path`` on success."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        with disk_errors(path):
            yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(parent)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- the lock

_HELD: dict[str, int] = {}  # realpath of a locked folder -> open fd (this process)


def check_out_dir(out_dir: str | os.PathLike, flag: str = "--out-dir") -> str:
    """``out_dir`` as a folder path; ValueError if it is a file (or under one)."""
    out_dir = os.fspath(out_dir)
    probe = os.path.abspath(out_dir)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise ValueError(f"{flag} {out_dir!r}: {probe} is a file, not a folder")
    return out_dir


def lock_name() -> str:
    """This process's lock file name (``.lock``, or ``.lock.<i>`` for process ``i > 0``)."""
    i = distributed.process_index()
    return LOCK if i == 0 else f"{LOCK}.{i}"


def lock(out_dir: str | os.PathLike) -> None:
    """Takes the run's exclusive lock on ``out_dir`` (created if missing) for the life
    of this process (:func:`lock_name`); a second take in the same process is a no-op.

    Raises:
        RunError: another live process holds the lock (its pid is named).
    """
    out_dir = check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    key = os.path.realpath(out_dir)
    if key in _HELD:
        return
    path = os.path.join(out_dir, lock_name())
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        try:
            with open(path, encoding="utf-8") as f:
                pid = f.read().strip() or "?"
        except OSError:
            pid = "?"
        raise RunError(f"{out_dir} is in use by another run (pid {pid}); wait for it or "
                       "choose another --out-dir") from None
    # A pid left in the file by a dead process is stale: flock let us in, overwrite it.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd


def unlock(out_dir: str | os.PathLike) -> None:
    fd = _HELD.pop(os.path.realpath(os.fspath(out_dir)), None)
    if fd is not None:
        os.close(fd)


# ---------------------------------------------------------------------- outputs


def earlier_outputs(out_dir: str | os.PathLike) -> list[str]:
    """Names of an earlier run's outputs present in ``out_dir``."""
    out_dir = os.fspath(out_dir)
    return [n for n in OUTPUTS if os.path.exists(os.path.join(out_dir, n))
            and not (n == "checkpoints" and not os.listdir(os.path.join(out_dir, n)))]


def refuse_earlier_run(out_dir: str | os.PathLike, *, overwrite: bool = False) -> None:
    """For a new run: removes an earlier run's outputs with ``overwrite``, else refuses.

    Raises:
        ValueError: the folder holds outputs of an earlier run (names them).
    """
    found = earlier_outputs(out_dir)
    distributed.barrier("run-dir-looked")  # every process looks before any removal
    if not found:
        return
    if not overwrite:
        raise ValueError(f"{os.fspath(out_dir)} holds outputs of an earlier run "
                         f"({', '.join(found)}): pass --resume to continue it, --overwrite "
                         "to replace it, or choose another --out-dir")
    if distributed.is_main():
        _remove(out_dir, found)
    distributed.barrier("run-dir-cleared")


def _remove(out_dir: str | os.PathLike, found: list[str]) -> None:
    for name in found:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def finished_step(out_dir: str | os.PathLike) -> int | None:
    """The step a finished run ended at (None if ``finished.json`` is absent or bad)."""
    try:
        with open(os.path.join(out_dir, FINISHED), encoding="utf-8") as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_finished(out_dir: str | os.PathLike, step: int) -> None:
    """Writes ``finished.json`` (process 0 only)."""
    if distributed.is_main():
        write_json_atomic(os.path.join(out_dir, FINISHED), {"step": int(step)})


def clear_finished(out_dir: str | os.PathLike) -> None:
    """Removes ``finished.json`` (process 0 only)."""
    if not distributed.is_main():
        return
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out_dir, FINISHED))


# ---------------------------------------------------------------------- identity


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def flag_name(key: str) -> str:
    """The command-line flag of an identity key (``sparse.mask_seed`` -> ``--mask-seed``)."""
    if key in FLAG_NAMES:
        return FLAG_NAMES[key]
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def identity_differences(stored: Mapping[str, Any], current: Mapping[str, Any],
                         defaults: Mapping[str, Any] | None = None) -> list[str]:
    """``"--flag (checkpoint X, now Y)"`` for each identity setting that differs.

    ``defaults`` (flattened key -> default value): a setting the checkpoint does not
    record (it predates the setting) that is at its default now is no difference.
    """
    a, b = flatten(stored), flatten(current)
    defaults = defaults or {}
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.rsplit(".", 1)[-1] in RESUMABLE:
            continue
        if key not in a and key in defaults and json.dumps(b.get(key)) == json.dumps(
                defaults[key]):
            continue
        if json.dumps(a.get(key), sort_keys=True) != json.dumps(b.get(key), sort_keys=True):
            diffs.append(f"{flag_name(key)} (checkpoint {a.get(key)!r}, now {b.get(key)!r})")
    return diffs


def check_identity(stored: Mapping[str, Any], current: Mapping[str, Any], where: str,
                   defaults: Mapping[str, Any] | None = None) -> None:
    """Raises ValueError naming the settings a resume changed (see
    :func:`identity_differences`)."""
    diffs = identity_differences(stored, current, defaults)
    if diffs:
        raise ValueError(f"cannot resume {where}: settings differ from the checkpoint's: "
                         f"{'; '.join(diffs)} (start a new run in another --out-dir)")
