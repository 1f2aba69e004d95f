"""Built-in tasks: where the prompts and answers come from, the instruction, and the reward.

Two presets (:data:`TASKS`):

* ``gsm8k``: GSM8K (``openai/gsm8k``, config ``main``), train on ``train`` (7,473), evaluate on
  ``test`` (1,319); ``question`` / ``answer`` (``... #### 72``); the ``gsm8k`` reward.
* ``math``: MATH (Hendrycks et al., arXiv 2103.03874): train on
  ``DigitalLearningGmbH/MATH-lighteval`` ``train`` (7,500; the gold is the last ``\\boxed{}`` of
  its ``solution``), evaluate on ``HuggingFaceH4/MATH-500`` ``test`` (500; field ``answer``);
  the ``math`` reward (math-verify).

Both ask for the final answer in ``\\boxed{}``. A preset's split can be read from a local file
instead (``source=``), which must have the same fields.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from sparsejax.data.dataset import load_prompt_dataset
from sparsejax.data.gsm8k import BOXED_INSTRUCTION

if TYPE_CHECKING:
    import datasets

__all__ = ["DatasetSpec", "TASKS", "TaskPreset", "get_task", "load_task_split"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One split of a dataset: ``load_prompt_dataset(source, config=..., split=..., ...)``."""

    source: str
    split: str
    prompt_field: str
    answer_field: str
    config: str | None = None


@dataclasses.dataclass(frozen=True)
class TaskPreset:
    """A task: its train and eval splits, the instruction after each question, and its reward spec."""

    name: str
    train: DatasetSpec
    eval: DatasetSpec
    reward: str
    instruction: str = BOXED_INSTRUCTION


TASKS: dict[str, TaskPreset] = {
    "gsm8k": TaskPreset(
        name="gsm8k",
        train=DatasetSpec("openai/gsm8k", "train", "question", "answer", config="main"),
        eval=DatasetSpec("openai/gsm8k", "test", "question", "answer", config="main"),
        reward="gsm8k",
    ),
    "math": TaskPreset(
        name="math",
        train=DatasetSpec("DigitalLearningGmbH/MATH-lighteval", "train", "problem", "solution", config="default"),
        eval=DatasetSpec("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
        reward="math",
    ),
}
"""The built-in tasks by name."""


def get_task(name: str) -> TaskPreset:
    """The preset called ``name``; one-line ``ValueError`` naming the choices if unknown."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}.")
    return TASKS[name]


def load_task_split(
    task: str | TaskPreset,
    which: str = "train",
    *,
    source: str | os.PathLike | None = None,
    system_prompt: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """The ``train`` or ``eval`` split of a task (``messages`` and ``answer`` columns).

    ``source`` replaces the preset's hub id (e.g. a local ``.jsonl`` with the preset's fields).
    """
    preset = get_task(task) if isinstance(task, str) else task
    if which not in ("train", "eval"):
        raise ValueError(f"which must be 'train' or 'eval', got {which!r}.")
    spec = preset.train if which == "train" else preset.eval
    return load_prompt_dataset(
        spec.source if source is None else source, config=spec.config, split=spec.split,
        prompt_field=spec.prompt_field, answer_field=spec.answer_field, system_prompt=system_prompt,
        instruction=preset.instruction, limit=limit)
