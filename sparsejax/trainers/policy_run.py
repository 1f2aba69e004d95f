"""What every trainer run holds and checkpoints: the policy, its optimizer, the step."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsejax import checkpoint as ckpt_lib
from sparsejax.trainers.updater import Updater

PyTree = Any


class PolicyRun:
    """Checkpointing shared by the trainers.

    A subclass sets ``updater``, ``params``, ``opt_state``, ``step`` and ``checkpoints``
    (a :class:`~sparsejax.checkpoint.CheckpointManager`) and may add its own state with
    :meth:`_extra_state` / :meth:`_load_extra_state`. A checkpoint holds the policy as
    :meth:`Updater.checkpoint_tree` gives it (for a sparse run only the ``k`` trained
    values and the optimizer state), the step, and the extra state.
    """

    updater: Updater
    params: PyTree
    opt_state: PyTree
    step: int
    checkpoints: ckpt_lib.CheckpointManager

    def _extra_state(self) -> dict[str, Any]:
        """Arrays of the run's own state to checkpoint (e.g. PRNG key, data position)."""
        return {}

    def _load_extra_state(self, tree: dict[str, Any]) -> None:
        """Takes back :meth:`_extra_state` from a restored checkpoint; called before the
        policy's params and optimizer state are replaced."""

    def _checkpoint_tree(self) -> dict[str, Any]:
        return {**self.updater.checkpoint_tree(self.params, self.opt_state),
                "step": np.asarray(self.step, np.int64), **self._extra_state()}

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self.step, self._checkpoint_tree())

    def begin(self, resume: bool) -> int | None:
        """Starts a run: restores the newest checkpoint with ``resume`` (returning its
        step), else refuses a folder that holds an earlier run's checkpoints."""
        if resume:
            return self.restore_checkpoint()
        if self.checkpoints.latest_step() is not None:
            raise ValueError(f"{self.checkpoints.directory} holds checkpoints of an earlier "
                             "run; resume it or choose another output folder")
        return None

    def restore_checkpoint(self) -> int | None:
        """Restores the newest checkpoint; returns its step (None if there is none).

        For a sparse run the trainer must have been built on the same base params.
        """
        step = self.checkpoints.latest_step()
        if step is None:
            return None
        tree = self.checkpoints.restore(step, self._checkpoint_tree())
        self._load_extra_state(tree)
        self.params, self.opt_state = self.updater.restore_policy(self.params, tree)
        self.step = int(tree["step"])
        return self.step
