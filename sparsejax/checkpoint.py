"""Verified orbax checkpoints of sparse-training trees (params, optimizer state, mask).

Sparse trees hold zero-size arrays (the mask and moments of a frozen tensor), which
orbax refuses to write. These helpers swap them for ``None`` on save and rebuild them
from the target's shapes on restore, so any tree of arrays round-trips exactly.

:class:`CheckpointManager` keeps numbered checkpoints ``<directory>/<step>/`` of one
run. Each holds the orbax state (``state/``, written atomically by orbax) and then
``manifest.json`` (written atomically, last): the SHA-256 of every stored array and the
run's identity. A checkpoint without a manifest is incomplete; one whose arrays do not
match their checksums, or that orbax cannot read, is damaged. Restore verifies every
array and falls back to the newest intact checkpoint, reporting each one skipped in one
line; nothing corrupted is ever returned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparsejax import run_dir

PyTree = Any
MANIFEST = "manifest.json"
STATE = "state"


class CheckpointError(run_dir.RunError):
    """No intact checkpoint to restore (each one tried is named with its defect)."""


def _is_empty(x: Any) -> bool:
    return hasattr(x, "shape") and np.size(x) == 0 and len(np.shape(x)) > 0


def strip_empty(tree: PyTree) -> PyTree:
    """``tree`` with every zero-size array replaced by None."""
    return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def fill_empty(restored: PyTree, like: PyTree) -> PyTree:
    """Puts back the zero-size arrays of ``like`` that :func:`strip_empty` removed."""
    return jax.tree.map(
        lambda ref, got: np.zeros(ref.shape, ref.dtype) if _is_empty(ref) else got,
        like, restored, is_leaf=lambda x: x is None)


def checksums(tree: PyTree) -> dict[str, str]:
    """SHA-256 of each array of ``tree`` (dtype, shape and bytes), keyed by its path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out


def save(directory: str | os.PathLike, tree: PyTree) -> None:
    """Writes ``tree`` (arrays, scalars, NamedTuples, dicts) to a new orbax checkpoint."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(directory), strip_empty(tree))
        ckpt.wait_until_finished()


def restore(directory: str | os.PathLike, like: PyTree) -> PyTree:
    """Reads a checkpoint written by :func:`save` into the structure, shapes and
    dtypes (and shardings, for jax arrays) of ``like``."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, strip_empty(like))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.abspath(directory), target)
    return fill_empty(restored, like)


@contextlib.contextmanager
def _quiet_writer_threads() -> Iterator[None]:
    """Orbax writes in background threads (and tensorstore callbacks) that also print
    the error they hand back to the caller. While orbax writes, stderr goes to memory;
    it is replayed afterwards unless the write failed on a full disk, which the caller
    then reports once, in one line."""
    previous = threading.excepthook

    def hook(args):
        if not run_dir.is_disk_full(args.exc_value):
            previous(args)

    threading.excepthook = hook
    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        mem = os.memfd_create("orbax-stderr")
    except (AttributeError, OSError):  # no memfd (not Linux): only the thread hook
        saved_fd = mem = None
    if mem is not None:
        os.dup2(mem, 2)
    full = False
    try:
        yield
    except BaseException as e:
        full = run_dir.is_disk_full(e)
        raise
    finally:
        if full:  # late callbacks of the failed write keep raising: drop only those
            previous_unraisable = sys.unraisablehook

            def unraisable(args):
                if not _write_aftermath(args.exc_value):
                    previous_unraisable(args)

            sys.unraisablehook = unraisable
            threading.excepthook = lambda args: (None if _write_aftermath(args.exc_value)
                                                 else previous(args))
        else:
            threading.excepthook = previous
        if mem is not None:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            if not full:
                os.lseek(mem, 0, os.SEEK_SET)
                while chunk := os.read(mem, 1 << 16):
                    os.write(2, chunk)
            os.close(mem)


def _write_aftermath(err: BaseException | None) -> bool:
    """An error of a failed orbax write's leftover callbacks (full disk, closed loop)."""
    return run_dir.is_disk_full(err) or (isinstance(err, RuntimeError)
                                         and "Event loop is closed" in str(err))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CheckpointManager:
    """Numbered, verified checkpoints of one run in ``directory``; keeps the newest
    ``keep`` complete ones (see the module docstring).

    Saves are synchronous: when :meth:`save` returns, the checkpoint is on disk and
    complete. Older checkpoints are pruned only after a newer one is complete, so a
    failed save (a full disk, a kill) leaves every earlier checkpoint intact.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.keep = max(1, int(keep))

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def all_steps(self) -> list[int]:
        """Steps with a checkpoint folder, complete or not, oldest first."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(n) for n in os.listdir(self.directory)
                      if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

    def complete_steps(self) -> list[int]:
        return [s for s in self.all_steps()
                if os.path.isfile(os.path.join(self._path(s), MANIFEST))]

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (not yet verified), or None."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def manifest(self, step: int) -> dict[str, Any]:
        with open(os.path.join(self._path(step), MANIFEST), encoding="utf-8") as f:
            return json.load(f)

    def save(self, step: int, tree: PyTree, *, identity: Mapping[str, Any] | None = None
             ) -> None:
        """Writes checkpoint ``step`` (replacing one there), then prunes old ones.

        Raises:
            run_dir.DiskFullError: the disk filled (the partial checkpoint is removed).
        """
        path = self._path(step)
        host = jax.device_get(strip_empty(tree))
        try:
            with run_dir.disk_errors(path):
                os.makedirs(self.directory, exist_ok=True)
                if os.path.exists(path):
                    shutil.rmtree(path)
                os.makedirs(path)
                with _quiet_writer_threads(), ocp.StandardCheckpointer() as ckpt:
                    ckpt.save(os.path.join(path, STATE), host)
                    ckpt.wait_until_finished()
                manifest = {"format": 1, "step": int(step), "checksums": checksums(host),
                            "identity": dict(identity or {})}
                run_dir.write_json_atomic(os.path.join(path, MANIFEST), manifest)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self._prune(keep_also=step)

    def _prune(self, keep_also: int) -> None:
        keep = set(self.complete_steps()[-self.keep:]) | {keep_also}
        for s in self.all_steps():
            if s not in keep:
                shutil.rmtree(self._path(s), ignore_errors=True)
        for name in os.listdir(self.directory):  # orbax temp folders of killed saves
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def restore(self, step: int, like: PyTree) -> PyTree:
        """Checkpoint ``step`` in the structure of ``like``, verified against its
        manifest.

        Raises:
            CheckpointError: it is incomplete or damaged (one line saying how).
        """
        path = self._path(step)
        try:
            manifest = self.manifest(step)
            expected = manifest["checksums"]
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST})") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path} is damaged ({MANIFEST}: "
                                  f"{type(e).__name__})") from None
        stripped = strip_empty(like)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, stripped)
        try:
            with ocp.StandardCheckpointer() as ckpt:
                restored = ckpt.restore(os.path.join(path, STATE), target)
        except Exception as e:  # pylint: disable=broad-except  # any unreadable state
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"checkpoint {path} is damaged ({type(e).__name__}: "
                                  f"{first})") from None
        got = checksums(restored)
        bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        if bad:
            raise CheckpointError(f"checkpoint {path} is damaged (checksum of {bad[0]} "
                                  f"differs{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})")
        return fill_empty(restored, like)

    def restore_latest(self, like: PyTree, *,
                       check_identity: Callable[[Mapping[str, Any], str], None] | None = None,
                       report: Callable[[str], None] = _say) -> tuple[int, PyTree] | None:
        """``(step, tree)`` of the newest intact checkpoint, or None if there is none.

        Each incomplete or damaged checkpoint is reported in one line and skipped.
        ``check_identity(identity, path)`` runs on the newest checkpoint with a readable
        manifest and may raise (a resume with changed settings is refused, not skipped).

        Raises:
            CheckpointError: checkpoint folders exist but none is intact.
        """
        steps = self.all_steps()
        if not steps:
            return None
        problems, checked = [], False
        for step in reversed(steps):
            try:
                if check_identity is not None and not checked:
                    try:
                        identity = self.manifest(step).get("identity", {})
                    except (OSError, ValueError, AttributeError):
                        identity = None
                    if identity is not None:
                        check_identity(identity, self._path(step))
                        checked = True
                tree = self.restore(step, like)
            except CheckpointError as e:
                problems.append(str(e))
                older = [s for s in steps if s < step]
                report(f"warning: {e}; " + (f"falling back to checkpoint {older[-1]}"
                                            if older else "no older checkpoint"))
                continue
            return step, tree
        raise CheckpointError(f"no intact checkpoint in {self.directory} "
                              f"({len(problems)} tried, all incomplete or damaged)")

    def close(self) -> None:
        """Nothing to release (kept for the interface of orbax's manager)."""
