"""Orbax checkpoints of sparse-training trees (params, optimizer state, mask, metadata).

Sparse trees hold zero-size arrays (the mask and moments of a frozen tensor), which
orbax refuses to write. These helpers swap them for ``None`` on save and rebuild them
from the target's shapes on restore, so any tree of arrays round-trips exactly.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


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


class CheckpointManager:
    """Numbered checkpoints of one run in ``directory``, keeping the newest ``keep``.

    A thin wrapper over ``orbax.checkpoint.CheckpointManager`` that round-trips
    zero-size arrays (see :func:`strip_empty`). Saves are synchronous: when
    :meth:`save` returns, the checkpoint is on disk.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def save(self, step: int, tree: PyTree) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(strip_empty(tree)), force=True)
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, step: int, like: PyTree) -> PyTree:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, strip_empty(like))
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        return fill_empty(restored, like)

    def close(self) -> None:
        self._manager.close()
