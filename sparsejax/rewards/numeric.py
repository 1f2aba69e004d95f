"""Numeric answers (GSM8K): exact parsing of an answer string and the ``gsm8k`` reward.

The answer string is normalised (``$``, ``\\$``, thousands commas, ``{,}``, LaTeX spacing
``\\! \\, \\; \\ ``, ``\\text{}``-style wrappers, a trailing period, spaces, a unicode minus and,
optionally, ``%``) and parsed exactly as a :class:`fractions.Fraction`: integers, decimals,
``a/b``, ``\\frac{a}{b}`` (``\\dfrac``, ``\\tfrac``, ``\\frac12``) and mixed numbers
``2\\frac{1}{2}``. If the whole string is not a number but contains exactly one number
(``18 \\text{ dollars}``), that number is used. Two answers match iff their values are equal,
so ``"18" == "18.0" == "18.00" == "\\frac{36}{2}"``.

Digits are ASCII only (``٧٢`` and ``７２`` are not numbers). Spaces (and LaTeX spacing) between
digits are accepted only as thousands separators (``1 000``, ``1\\,000``): ``\\boxed{7 2}`` is not
72. Per-item functions never raise and never evaluate anything; numerals longer than
:data:`MAX_NUMBER_CHARS` are rejected. The batch reward raises a one-line ``ValueError`` for
mismatched lengths (see :func:`sparsejax.rewards.check_batch`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from sparsejax.rewards.base import check_batch
from sparsejax.rewards.extract import _NUMBER_RE, _signed, completion_text, extract_answer

__all__ = [
    "MAX_NUMBER_CHARS",
    "answers_match",
    "gold_answer",
    "gsm8k_accuracy_reward",
    "parse_number",
    "score_completion",
]

MAX_NUMBER_CHARS = 64
"""Longest numeral (digits, sign, point) that is parsed; longer ones are not answers."""

_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_THOUSANDS_RE = re.compile(r"[+-]?[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]*)?")
_SPACED_THOUSANDS_RE = re.compile(r"(?<![0-9.])[0-9]{1,3}(?: [0-9]{3})+(?![0-9])")
_SPACED_DIGITS_RE = re.compile(r"[0-9.]\s+[0-9.]")
_SLASH_RE = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+))/((?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+))")
_FRAC_RE = re.compile(r"([+-]?)([0-9]*)\\[dt]?frac(?:\{([^{}]+)\}\{([^{}]+)\}|([0-9])([0-9]))")
_LATEX_SPACES = ("\\!", "\\,", "\\;", "\\:", "\\ ", "~")


def _clean(text: str, strip_percent: bool) -> str | None:
    """The answer string without formatting, or ``None`` if digits are separated by spaces."""
    s = text.strip()
    for _ in range(3):  # unwrap nested \text{...} and the like
        s = _WRAPPER_RE.sub(r"\1", s)
    s = s.replace("\u2212", "-").replace("{,}", "").replace("\\$", "").replace("$", "")
    for space in _LATEX_SPACES:
        s = s.replace(space, " ")
    for command in ("\\left", "\\right", "\\displaystyle"):
        s = s.replace(command, "")
    if strip_percent:
        s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", " ", s).strip()
    s = _SPACED_THOUSANDS_RE.sub(lambda m: m.group().replace(" ", ""), s)
    if _SPACED_DIGITS_RE.search(s):  # "7 2" is two numbers, not 72
        return None
    s = s.replace(" ", "").rstrip(".")
    if len(s) > 2 and s[0] == "{" and s[-1] == "}":
        s = s[1:-1]
    return s


def _decimal(s: str) -> Fraction | None:
    if len(s) > MAX_NUMBER_CHARS:
        return None
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    if not _DECIMAL_RE.fullmatch(s):
        return None
    if s.endswith("."):
        s = s[:-1]
    return Fraction(s)


def _ratio(numerator: str, denominator: str) -> Fraction | None:
    num, den = _decimal(numerator), _decimal(denominator)
    if num is None or den is None or den == 0:
        return None
    return num / den


def _parse_clean(s: str) -> Fraction | None:
    if not s:
        return None
    value = _decimal(s)
    if value is not None:
        return value
    m = _SLASH_RE.fullmatch(s)
    if m:
        return _ratio(m.group(1), m.group(2))
    m = _FRAC_RE.fullmatch(s)
    if m:
        sign, whole, num, den, num1, den1 = m.groups()
        value = _ratio(num if num is not None else num1, den if den is not None else den1)
        if value is None:
            return None
        if whole:
            whole_value = _decimal(whole)
            if whole_value is None:
                return None
            value = whole_value + value
        return -value if sign == "-" else value
    return None


def parse_number(text: Any, *, strip_percent: bool = True, embedded: bool = True) -> Fraction | None:
    """The exact value of a numeric answer string, or ``None`` if it is not one.

    ``"$1,234.50."`` gives ``Fraction(2469, 2)``; ``"\\frac{1}{2}"`` and ``"1/2"`` give ``1/2``;
    ``"50\\%"`` gives ``50`` when ``strip_percent`` (else ``None``); ``"18 \\text{ apples}"``
    gives ``18`` when ``embedded`` (exactly one number in a non-numeric string; ``"x+1"`` gives
    1 too, so pass ``embedded=False`` where the string may be an expression); ``"3 or 4"``,
    ``"7 2"`` and ``"٧٢"`` give ``None``.
    """
    if not isinstance(text, str) or not text:
        return None
    try:
        if len(text) > 10_000:
            return None
        s = _clean(text, strip_percent)
        if s is None:
            return None
        value = _parse_clean(s)
        if value is not None:
            return value
        if not embedded or (not strip_percent and "%" in s):
            return None
        candidates = list(_NUMBER_RE.finditer(s))
        if len(candidates) == 1 and "frac" not in s and "/" not in s:
            return _decimal(_signed(s, candidates[0]))
        return None
    except Exception:
        return None


def answers_match(predicted: Any, gold: Any, *, strip_percent: bool = True) -> bool:
    """True iff both strings parse to numbers (see :func:`parse_number`) of equal value."""
    a = parse_number(predicted, strip_percent=strip_percent)
    b = parse_number(gold, strip_percent=strip_percent)
    return a is not None and b is not None and a == b


def gold_answer(gold: Any) -> str | None:
    """A gold answer as a string: a cleaned one (``"72"``), or the text after a raw ``#### 72``."""
    if not isinstance(gold, str):
        gold = str(gold) if isinstance(gold, (int, Fraction)) or type(gold) is float else None
    if gold is None:
        return None
    if "####" in gold:
        gold = gold.rsplit("####", 1)[1]
    return gold.strip()


def score_completion(completion: Any, gold: Any, *, strip_percent: bool = True) -> float:
    """1.0 if the completion's extracted answer equals ``gold`` numerically, else 0.0. Never raises."""
    try:
        predicted = extract_answer(completion_text(completion))
        return 1.0 if answers_match(predicted, gold_answer(gold), strip_percent=strip_percent) else 0.0
    except Exception:
        return 0.0


def gsm8k_accuracy_reward(completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """The ``gsm8k`` reward: ``1.0`` per completion whose answer equals its gold ``answer`` numerically.

    ``completions`` are strings or conversational message lists; ``answer`` is the dataset
    column (raw GSM8K ``... #### N`` or the cleaned ``N``), one per completion. Extra dataset
    columns arrive as ``kwargs`` and are ignored.

    Raises:
        ValueError: if ``completions`` and ``answer`` are not lists of the same length.
    """
    check_batch(completions, answer, "gsm8k")
    return [score_completion(c, g) for c, g in zip(completions, answer, strict=True)]
