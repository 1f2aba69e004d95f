"""The reward function signature shared by every reward, and the checks of a batch.

A reward function is called once per batch::

    reward(completions: Sequence[str | list[dict]], answers: Sequence[Any], **kwargs) -> list[float]

``completions`` are strings or TRL's conversational form (a list of messages, see
:func:`sparsejax.rewards.completion_text`); ``answers`` holds one gold answer per completion
(the dataset's answer column, repeated for each completion of a prompt); keyword arguments
(``prompts``, ``completion_ids`` and the dataset's columns, one value per completion: see
:mod:`sparsejax.rewards.arguments`) reach it as far as its signature takes them, and are
ignored by the built-ins. It returns
one float per completion; ``nan`` marks a completion that cannot be scored (the GRPO
advantages leave it out of the group means).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["RewardFn", "check_batch"]


class RewardFn(Protocol):
    """``reward(completions, answers, **kwargs) -> list[float]``, one float per completion."""

    def __call__(self, completions: Sequence[Any], answers: Sequence[Any], /, **kwargs: Any) -> list[float]: ...


def _length(value: Any, what: str, name: str) -> int:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} reward: {what} must be a list (one entry per completion), "
                         f"got {type(value).__name__}.")
    return len(value)


def check_batch(completions: Any, answers: Any, name: str) -> int:
    """The batch size; raises a one-line ``ValueError`` unless both are sequences of one length."""
    n = _length(completions, "completions", name)
    m = _length(answers, "answers", name)
    if n != m:
        raise ValueError(f"{name} reward: {n} completions but {m} answers; pass one answer per completion.")
    return n
