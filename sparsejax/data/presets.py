"""Built-in tasks: where the prompts and answers come from, the instruction, and the reward.

Three presets (:data:`TASKS`):

* ``gsm8k``: GSM8K (``openai/gsm8k``, config ``main``), train on ``train`` (7,473), evaluate on
  ``test`` (1,319); ``question`` / ``answer`` (``... #### 72``); the ``gsm8k`` reward.
* ``math``: MATH (Hendrycks et al., arXiv 2103.03874): train on
  ``DigitalLearningGmbH/MATH-lighteval`` ``train`` (7,500; the gold is the last ``\\boxed{}`` of
  its ``solution``), evaluate on ``HuggingFaceH4/MATH-500`` ``test`` (500; field ``answer``);
  the ``math`` reward (math-verify).
* ``arithmetic``: short word problems with one or two operations on small numbers, generated
  in code (:mod:`sparsejax.data.arithmetic`): train on 10,000 drawn problems, evaluate on 320
  distinct ones whose (template, numbers) never occur in training; ``question`` / ``answer``;
  the instruction "Answer with a single number."; the ``gsm8k`` reward (boxed, "the answer
  is", else the last number). A task a 135M instruct model partly solves, nothing downloaded.

``gsm8k`` and ``math`` ask for the final answer in ``\\boxed{}``. A preset's split can be read
from a local file instead (``source=``), which must have the same fields.

A generated split (source ``generated:NAME``, :data:`GENERATORS`) is written once as a JSON
Lines file under the cache folder (``$SPARSEJAX_CACHE`` or ``~/.cache/sparsejax``, in
``tasks/``) and read from there like any local file (:func:`split_source`); the file is
rewritten whenever its content differs from what the generator gives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from sparsejax.data import arithmetic
from sparsejax.data.dataset import load_prompt_dataset
from sparsejax.data.gsm8k import BOXED_INSTRUCTION

if TYPE_CHECKING:
    import datasets

__all__ = ["DatasetSpec", "GENERATED_PREFIX", "GENERATORS", "TASKS", "TaskPreset", "get_task",
           "load_task_split", "split_source"]

GENERATED_PREFIX = "generated:"
"""A :class:`DatasetSpec` source ``generated:NAME`` is the generator ``GENERATORS[NAME]``."""

GENERATORS: dict[str, Callable[[str], list[dict]]] = {
    "arithmetic": arithmetic.generate_split,
}
"""Generated datasets by name: ``rows = GENERATORS[name](split)``, a list of dicts."""


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
    "arithmetic": TaskPreset(
        name="arithmetic",
        train=DatasetSpec("generated:arithmetic", "train", "question", "answer"),
        eval=DatasetSpec("generated:arithmetic", "test", "question", "answer"),
        reward="gsm8k",
        instruction=arithmetic.INSTRUCTION,
    ),
}
"""The built-in tasks by name."""


def get_task(name: str) -> TaskPreset:
    """The preset called ``name``; one-line ``ValueError`` naming the choices if unknown."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}.")
    return TASKS[name]


def split_source(spec: DatasetSpec) -> str:
    """Where ``spec``'s rows are read from: its hub id or file, or for a generated source
    (``generated:NAME``) the JSON Lines file of the split, written to the cache if absent or
    stale (atomically: a concurrent reader sees the old file or the new one)."""
    if not spec.source.startswith(GENERATED_PREFIX):
        return spec.source
    name = spec.source[len(GENERATED_PREFIX):]
    if name not in GENERATORS:
        raise ValueError(f"unknown generated dataset {name!r}: expected one of "
                         f"{', '.join(GENERATORS)}.")
    from sparsejax.models.smollm2 import default_cache_dir  # standard library only
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n"
                   for row in GENERATORS[name](spec.split))
    path = default_cache_dir() / "tasks" / name / f"{spec.split}.jsonl"
    tmp = None
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return str(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                         suffix=".tmp", delete=False) as f:
            tmp = f.name
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f"cannot write the {name} {spec.split} split to {path}: "
                         f"{e.strerror or e}") from None
    return str(path)


def load_task_split(
    task: str | TaskPreset,
    which: str = "train",
    *,
    source: str | os.PathLike | None = None,
    system_prompt: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """The ``train`` or ``eval`` split of a task (``messages`` and ``answer`` columns).

    ``source`` replaces the preset's hub id or generator (e.g. a local ``.jsonl`` with the
    preset's fields).
    """
    preset = get_task(task) if isinstance(task, str) else task
    if which not in ("train", "eval"):
        raise ValueError(f"which must be 'train' or 'eval', got {which!r}.")
    spec = preset.train if which == "train" else preset.eval
    return load_prompt_dataset(
        split_source(spec) if source is None else source, config=spec.config, split=spec.split,
        prompt_field=spec.prompt_field, answer_field=spec.answer_field, system_prompt=system_prompt,
        instruction=preset.instruction, limit=limit)
