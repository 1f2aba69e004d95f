"""Verified, sharded orbax checkpoints of sparse-training trees (params, optimizer
state, mask), restored onto any mesh.

Sparse trees hold zero-size arrays (the mask and moments of a frozen tensor), which
orbax refuses to write. These helpers swap them for ``None`` on save and rebuild them
from the target's shapes (and shardings) on restore, so any tree of arrays round-trips
exactly.

Sharding: jax arrays are written as they lie, each process writing the shards it holds
(orbax coordinates the processes); nothing is gathered. Restore reads into the
structure, shapes, dtypes and shardings of a target tree (``like``), so a checkpoint
written on one mesh resumes on another mesh, on one device, or on another number of
processes (orbax reads each target shard's slice). Before any array is read, every
tensor's saved shape and dtype are compared with the target's, and the target's
sharding must divide its shape: otherwise a one-line :class:`ReshardError` names the
tensor.

:class:`CheckpointManager` keeps numbered checkpoints ``<directory>/<step>/`` of one
run. Each holds the orbax state (``state/``, written atomically by orbax) and then
``manifest.json`` (written atomically, last, by process 0): each stored array's shape,
dtype and checksum, and the run's identity. A checkpoint without a manifest is
incomplete; one whose arrays do not match their checksums, or that orbax cannot read, is
damaged. Restore verifies every array and falls back to the newest intact checkpoint,
reporting each one skipped in one line; nothing corrupted is ever returned.

The checksum (:func:`sparsejax.runs.fingerprint.fingerprints`) is a function of an array's
global value alone, not of its layout: each device hashes its own shards and one small
reduction combines them, so every process gets the same value without gathering an
array, and a checkpoint read back on another mesh verifies against the value computed
on the mesh that wrote it. (Manifests of format 1 hold SHA-256 digests of the bytes;
they still verify where the arrays are addressable by one process.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sparsejax.parallel import distributed
from sparsejax.runs import run_dir
from sparsejax.runs.fingerprint import checksums, fingerprints, tensor_specs
from sparsejax.types import PyTree

MANIFEST = "manifest.json"
STATE = "state"
FORMAT = 2


class CheckpointError(run_dir.RunError):
    """No intact checkpoint to restore (each one tried is named with its defect)."""


class ReshardError(ValueError):
    """A checkpoint's tensor does not fit the run's target (shape, dtype or sharding);
    a setting to fix, not damage: restore refuses instead of falling back."""


def _size(x: Any) -> int:
    return math.prod(x.shape)


def _is_empty(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) > 0 and _size(x) == 0


def strip_empty(tree: PyTree) -> PyTree:
    """``tree`` with every zero-size array replaced by None."""
    return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def _empty_like(ref: Any) -> Any:
    sharding = getattr(ref, "sharding", None)
    zeros = np.zeros(ref.shape, ref.dtype)
    if isinstance(ref, np.ndarray) or sharding is None:
        return zeros
    return jax.make_array_from_callback(ref.shape, sharding, lambda index: zeros[index])


def fill_empty(restored: PyTree, like: PyTree) -> PyTree:
    """Puts back the zero-size arrays of ``like`` that :func:`strip_empty` removed (jax
    arrays with ``like``'s sharding, numpy arrays for numpy leaves)."""
    return jax.tree.map(lambda ref, got: _empty_like(ref) if _is_empty(ref) else got,
                        like, restored, is_leaf=lambda x: x is None)


# ---------------------------------------------------------------------- resharding


def _process_local(x: Any) -> bool:
    """A jax array of one process in a run of several (e.g. a PRNG key on a process's
    own device): every process holds the same value, stored once like a numpy array."""
    return (isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and distributed.is_multiprocess()
            and getattr(x, "sharding", None) is not None and x.sharding.is_fully_addressable)


def _uncommitted(x: Any) -> bool:
    """A jax array not committed to a device (e.g. ``jax.random.key(0)``): restored
    uncommitted too, so it still meets arrays on any mesh in one jitted call."""
    return isinstance(x, jax.Array) and not getattr(x, "committed", True)


def _to_storable(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: np.asarray(x) if _process_local(x) else x, tree)


def _target(like: PyTree) -> PyTree:
    """What orbax restores into: shape, dtype and (for jax arrays) sharding of ``like``."""
    def one(x):
        if _process_local(x) or _uncommitted(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return ocp.utils.to_shape_dtype_struct(x)
    return jax.tree.map(one, like)


def _placed(restored: PyTree, like: PyTree) -> PyTree:
    """Leaves restored on the host put back where ``like``'s are: uncommitted arrays
    uncommitted, process-local ones on their device (see :func:`_process_local`)."""
    def one(ref, got):
        if got is None:
            return got
        if _uncommitted(ref):
            return jnp.asarray(np.asarray(got))
        if _process_local(ref):
            return jax.device_put(got, ref.sharding)
        return got
    return jax.tree.map(one, like, restored, is_leaf=lambda x: x is None)


def check_reshardable(saved: Mapping[str, list], target: PyTree, where: str) -> None:
    """Raises :class:`ReshardError` (one line naming the tensor) unless every tensor of
    ``target`` was saved (``saved``: :func:`tensor_specs` of the checkpoint) with its
    shape and dtype and the target's sharding divides its shape."""
    specs = tensor_specs(target)
    extra = sorted(set(specs) - set(saved))
    if extra:
        raise ReshardError(f"cannot restore {where}: it has no tensor {extra[0]}"
                           f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}; "
                           "the run's state differs from the checkpoint's")
    missing = sorted(set(saved) - set(specs))
    if missing:
        raise ReshardError(f"cannot restore {where}: the run has no tensor {missing[0]} "
                           "that the checkpoint holds")
    for key, (shape, dtype) in specs.items():
        want_shape, want_dtype = saved[key]
        if list(shape) != list(want_shape) or dtype != want_dtype:
            raise ReshardError(f"cannot restore {where}: tensor {key} was saved as "
                               f"{want_dtype}{tuple(want_shape)}, the run expects "
                               f"{dtype}{tuple(shape)}")
    for path, x in jax.tree_util.tree_flatten_with_path(target)[0]:
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, jax.sharding.NamedSharding):
            continue
        sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape))
        for dim, axes in zip(x.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            parts = math.prod(sizes[a] for a in axes)
            if parts > 1 and dim % parts:
                raise ReshardError(
                    f"cannot restore {where}: tensor {jax.tree_util.keystr(path)} of shape "
                    f"{tuple(x.shape)} cannot be split {parts} ways over mesh axis "
                    f"{'x'.join(axes)} (dimension {dim}); choose a --mesh whose axes divide it")


def save(directory: str | os.PathLike, tree: PyTree) -> None:
    """Writes ``tree`` (arrays, scalars, NamedTuples, dicts) to a new orbax checkpoint;
    sharded jax arrays are written shard by shard by the processes that hold them."""
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(directory), _to_storable(strip_empty(tree)))
        ckpt.wait_until_finished()


def restore(directory: str | os.PathLike, like: PyTree) -> PyTree:
    """Reads a checkpoint written by :func:`save` into the structure, shapes and
    dtypes (and shardings, for jax arrays) of ``like`` (arrays or
    ``jax.ShapeDtypeStruct``s): a tree saved on one mesh restores onto any other."""
    stripped = strip_empty(like)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(os.path.abspath(directory), _target(stripped))
    return fill_empty(_placed(restored, stripped), like)


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

        Jax arrays are written where they lie (sharded arrays shard by shard, by the
        process holding each shard); with several processes every process calls this
        and process 0 alone manages the folders and writes the manifest.

        Raises:
            run_dir.DiskFullError: the disk filled (the partial checkpoint is removed).
        """
        path = self._path(step)
        tree = _to_storable(strip_empty(tree))
        main = distributed.is_main()
        try:
            with run_dir.disk_errors(path):
                if main:
                    os.makedirs(self.directory, exist_ok=True)
                    if os.path.exists(path):
                        shutil.rmtree(path)
                    os.makedirs(path)
                distributed.barrier(f"checkpoint-{step}-folder")
                with _quiet_writer_threads(), ocp.StandardCheckpointer() as ckpt:
                    ckpt.save(os.path.join(path, STATE), tree)
                    ckpt.wait_until_finished()
                manifest = {"format": FORMAT, "step": int(step),
                            "tensors": tensor_specs(tree), "checksums": fingerprints(tree),
                            "identity": dict(identity or {})}
                if main:
                    run_dir.write_json_atomic(os.path.join(path, MANIFEST), manifest)
        except BaseException:
            if main:
                shutil.rmtree(path, ignore_errors=True)
            raise
        if main:
            self._prune(keep_also=step)
        distributed.barrier(f"checkpoint-{step}-done")

    def _prune(self, keep_also: int) -> None:
        keep = set(self.complete_steps()[-self.keep:]) | {keep_also}
        for s in self.all_steps():
            if s not in keep:
                shutil.rmtree(self._path(s), ignore_errors=True)
        for name in os.listdir(self.directory):  # orbax temp folders of killed saves
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def restore(self, step: int, like: PyTree) -> PyTree:
        """Checkpoint ``step`` in the structure, shapes, dtypes and shardings of ``like``
        (arrays or ``jax.ShapeDtypeStruct``s; any mesh), verified against its manifest.

        Raises:
            CheckpointError: it is incomplete or damaged (one line saying how).
            ReshardError: a tensor does not fit ``like`` (names it; nothing is read).
        """
        path = self._path(step)
        try:
            manifest = self.manifest(step)
            expected = manifest["checksums"]
            fmt = int(manifest.get("format", 1))
            saved = manifest["tensors"] if fmt >= 2 else None
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST})") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"checkpoint {path} is damaged ({MANIFEST}: "
                                  f"{type(e).__name__})") from None
        stripped = strip_empty(like)
        target = _target(stripped)
        if saved is not None:
            check_reshardable(saved, target, path)
        try:
            with ocp.StandardCheckpointer() as ckpt:
                restored = ckpt.restore(os.path.join(path, STATE), target)
        except Exception as e:  # any unreadable state
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"checkpoint {path} is damaged ({type(e).__name__}: "
                                  f"{first})") from None
        got = fingerprints(restored) if fmt >= 2 else checksums(restored)
        bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
        if saved is not None:
            specs = tensor_specs(restored)
            bad += sorted(k for k in specs if specs[k] != saved.get(k) and k not in bad)
        if bad:
            raise CheckpointError(f"checkpoint {path} is damaged (checksum of {bad[0]} "
                                  f"differs{f' and {len(bad) - 1} more' if len(bad) > 1 else ''})")
        return fill_empty(_placed(restored, stripped), like)

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
