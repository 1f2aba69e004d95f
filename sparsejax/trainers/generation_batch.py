"""One GRPO generation batch: completions sampled and scored once, trained on by one or
more optimizer steps, and kept in checkpoints so that a resume in the middle of them
continues exactly.

With TRL's ``steps_per_generation`` and ``num_iterations`` (see
:class:`~sparsejax.config.GRPOConfig`), a generation batch holds the rows of
``k = steps_per_generation_batch`` optimizer steps; they are trained on in ``k`` slices,
and the ``k`` slices again in each of ``num_iterations`` passes. Its arrays are the
trainer's batch arrays over all rows (``prompt_tokens``, ``prompt_mask``, ``tokens``,
``mask``, ``advantages``, and where the run needs them ``old_logps``, ``ref_logps``,
``truncated``), already in training order, plus the rewards and the loss normaliser.

A checkpoint holds the batch at fixed shapes (:func:`storable`: prompts left-padded to
the run's prompt capacity, completions right-padded to ``max_new_tokens``, the used
widths beside them), so the tree restored into is known before the checkpoint is read.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sparsejax.config import GRPOConfig

#: Dtypes of the batch arrays as the trainer builds them (and a checkpoint stores them).
DTYPES = {"prompt_tokens": np.int32, "prompt_mask": np.int32, "tokens": np.int32,
          "mask": np.int32, "advantages": np.float32, "old_logps": np.float32,
          "ref_logps": np.float32, "truncated": np.bool_}
#: Arrays over the prompt positions (left-padded) and over the completion positions.
PROMPT_ARRAYS = ("prompt_tokens", "prompt_mask")
COMPLETION_ARRAYS = ("tokens", "mask", "old_logps", "ref_logps")


@dataclasses.dataclass
class GenerationBatch:
    """The rows of one generation batch in training order.

    Attributes:
        index: the generation number (the optimizer steps ``index * steps_per_rollout``
            onwards train on it).
        arrays: name -> array with one row per completion (see the module docstring).
        rewards: the reward of each row ``[R]``.
        num_items: the token-count losses' normaliser of one micro-batch.
    """

    index: int
    arrays: dict[str, np.ndarray]
    rewards: np.ndarray
    num_items: float

    def step_rows(self, position: int, steps_per_batch: int) -> dict[str, np.ndarray]:
        """The rows of the ``position``-th optimizer step since the generation: slice
        ``position % steps_per_batch`` of the ``steps_per_batch`` equal slices."""
        rows = len(self.rewards) // steps_per_batch
        start = (position % steps_per_batch) * rows
        return {k: v[start:start + rows] for k, v in self.arrays.items()}


def array_names(cfg: GRPOConfig) -> tuple[str, ...]:
    """The batch arrays a run with ``cfg`` trains on."""
    names = ["prompt_tokens", "prompt_mask", "tokens", "mask", "advantages"]
    if cfg.steps_per_rollout > 1:
        names.append("old_logps")
    if cfg.beta > 0:
        names.append("ref_logps")
    if cfg.mask_truncated_completions:
        names.append("truncated")
    return tuple(names)


def rows_per_generation(cfg: GRPOConfig) -> int:
    return cfg.steps_per_generation_batch * cfg.prompts_per_step * cfg.num_generations


def empty_storable(cfg: GRPOConfig, prompt_capacity: int) -> dict[str, np.ndarray]:
    """The checkpoint layout of a run's generation batch, holding none
    (``meta[0] = -1``)."""
    rows = rows_per_generation(cfg)
    out = {}
    for name in array_names(cfg):
        width = (prompt_capacity if name in PROMPT_ARRAYS
                 else cfg.max_new_tokens if name in COMPLETION_ARRAYS else None)
        out[name] = np.zeros((rows,) if width is None else (rows, width), DTYPES[name])
    out["rewards"] = np.zeros((rows,), np.float32)
    out["num_items"] = np.zeros((), np.float64)
    out["meta"] = np.asarray([-1, 0, 0], np.int64)  # index, prompt width, completion width
    return out


def storable(batch: GenerationBatch | None, cfg: GRPOConfig, prompt_capacity: int
             ) -> dict[str, np.ndarray]:
    """``batch`` (or none) in the fixed layout of :func:`empty_storable`."""
    out = empty_storable(cfg, prompt_capacity)
    if batch is None:
        return out
    prompt_width = batch.arrays["prompt_tokens"].shape[1]
    width = batch.arrays["tokens"].shape[1]
    if prompt_width > prompt_capacity or width > cfg.max_new_tokens:
        raise ValueError(f"a generation batch of widths ({prompt_width}, {width}) does not "
                         f"fit the checkpoint layout ({prompt_capacity}, {cfg.max_new_tokens})")
    for name, value in batch.arrays.items():
        if name in PROMPT_ARRAYS:
            out[name][:, prompt_capacity - prompt_width:] = value
        elif name in COMPLETION_ARRAYS:
            out[name][:, :width] = value
        else:
            out[name][:] = value
    out["rewards"][:] = batch.rewards
    out["num_items"] = np.asarray(batch.num_items, np.float64)
    out["meta"] = np.asarray([batch.index, prompt_width, width], np.int64)
    return out


def from_storable(tree: dict[str, np.ndarray], cfg: GRPOConfig) -> GenerationBatch | None:
    """The batch :func:`storable` stored (None if it stored none)."""
    index, prompt_width, width = (int(x) for x in np.asarray(tree["meta"]))
    if index < 0:
        return None
    arrays = {}
    for name in array_names(cfg):
        value = np.asarray(tree[name]).astype(DTYPES[name])
        if name in PROMPT_ARRAYS:
            value = value[:, value.shape[1] - prompt_width:]
        elif name in COMPLETION_ARRAYS:
            value = value[:, :width]
        arrays[name] = np.ascontiguousarray(value)
    return GenerationBatch(index, arrays, np.asarray(tree["rewards"], np.float32),
                           float(np.asarray(tree["num_items"])))
