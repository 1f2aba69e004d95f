"""String rewards: ``exact`` (normalised string match) and ``format`` (a non-empty ``\\boxed{}``).

``format`` ignores the answers and is meant as a small shaping term beside an accuracy reward
(``combine_rewards([("math", 1.0), ("format", 0.1)])``): it pays for following the prompt's
"put your final answer within ``\\boxed{}``" instruction, right or wrong.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from sparsejax.rewards.base import check_batch
from sparsejax.rewards.extract import completion_text, extract_boxed

__all__ = ["boxed_format_reward", "exact_match_reward", "format_reward", "normalize_text"]

MAX_EXACT_CHARS = 10_000
"""Answers longer than this never match exactly (bounded work per completion)."""

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def normalize_text(text: Any) -> str | None:
    """``text`` for comparison: NFC, case-folded, ``\\text{}``-style wrappers and ``$`` removed,
    surrounding quotes and a final period dropped, whitespace collapsed; ``None`` if not a string
    or longer than :data:`MAX_EXACT_CHARS`.

    Digits are not touched: ``"７"`` (fullwidth) stays different from ``"7"``.
    """
    if not isinstance(text, str) or len(text) > MAX_EXACT_CHARS:
        return None
    s = unicodedata.normalize("NFC", text)
    for _ in range(3):
        s = _WRAPPER_RE.sub(r"\1", s)
    s = s.replace("\\$", "").replace("$", "")
    s = " ".join(s.split()).casefold()
    s = s.rstrip(".").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s


def _answer_of(text: str) -> str:
    boxed = extract_boxed(text)
    return boxed if boxed is not None else text


def exact_match_reward(completions: Sequence[Any], answers: Sequence[Any], **kwargs: Any) -> list[float]:
    """The ``exact`` reward: ``1.0`` per completion whose answer equals its gold answer as a string.

    The completion's answer is its last ``\\boxed{}`` content if it has one, else the whole text;
    the gold's likewise. Both go through :func:`normalize_text`: ``"\\boxed{ Paris. }"`` matches
    ``"paris"``; ``"Paris, France"`` does not. Use it for short closed-form answers (a word, a
    label, a choice letter); numeric answers are better served by ``gsm8k`` or ``math``.

    Raises:
        ValueError: if ``completions`` and ``answers`` are not lists of the same length.
    """
    check_batch(completions, answers, "exact")
    out = []
    for completion, gold in zip(completions, answers, strict=True):
        predicted = normalize_text(_answer_of(completion_text(completion)))
        expected = normalize_text(_answer_of(gold)) if isinstance(gold, str) else None
        out.append(1.0 if predicted is not None and expected and predicted == expected else 0.0)
    return out


def format_reward(completions: Sequence[Any], answers: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
    """The ``format`` reward: ``1.0`` per completion with a complete, non-empty ``\\boxed{...}``.

    ``answers`` are accepted (for the common signature) and ignored; when given, their length
    must match.

    Raises:
        ValueError: if ``completions`` is not a list, or ``answers`` has another length.
    """
    if answers is None:
        check_batch(completions, completions, "format")
    else:
        check_batch(completions, answers, "format")
    return [1.0 if extract_boxed(completion_text(c)) else 0.0 for c in completions]


boxed_format_reward = format_reward
"""Former name of :func:`format_reward`."""
