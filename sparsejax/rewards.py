"""Verifiable rewards for math word problems (GSM8K): answer extraction and numeric comparison.

A completion's answer is taken from, in order of preference:

1. the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, nested braces allowed;
2. the last ``#### N`` (GSM8K's own answer marker);
3. the last "answer is N" / "answer: N" phrase (case-insensitive);
4. the last number in the text.

The answer string is normalised (``$``, ``\\$``, thousands commas, ``{,}``, LaTeX spacing
``\\! \\, \\; \\ ``, ``\\text{}``-style wrappers, a trailing period, spaces, a unicode minus and,
optionally, ``%``) and parsed exactly as a :class:`fractions.Fraction`: integers, decimals,
``a/b``, ``\\frac{a}{b}`` (``\\dfrac``, ``\\tfrac``, ``\\frac12``) and mixed numbers
``2\\frac{1}{2}``. If the whole string is not a number but contains exactly one number
(``18 \\text{ dollars}``), that number is used. Two answers match iff their values are equal,
so ``"18" == "18.0" == "18.00" == "\\frac{36}{2}"``.

Every public function is total: any input (including non-strings, empty or multi-megabyte
strings) yields a value, never an exception, and nothing is ever evaluated. Scanning is linear
in the text length, and numerals longer than :data:`MAX_NUMBER_CHARS` are rejected.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

__all__ = [
    "MAX_NUMBER_CHARS",
    "answers_match",
    "boxed_format_reward",
    "completion_text",
    "extract_answer",
    "extract_boxed",
    "gsm8k_accuracy_reward",
    "parse_number",
    "score_completion",
]

MAX_NUMBER_CHARS = 64
"""Longest numeral (digits, sign, point) that is parsed; longer ones are not answers."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
# A minus counts as a sign only when it does not follow a word character or closing bracket
# ("3-4" is a range, not -4).
_SIGNED_NUMBER_RE = re.compile(rf"(?:(?<![\w)\]}}])-\s?)?(?:{_NUMBER})")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|was|=|:)\s*:?[ \t]*([^\n]*)", re.IGNORECASE)
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DECIMAL_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_SLASH_RE = re.compile(r"([+-]?(?:\d+(?:\.\d+)?|\.\d+))/((?:\d+(?:\.\d+)?|\.\d+))")
_FRAC_RE = re.compile(r"([+-]?)(\d*)\\[dt]?frac(?:\{([^{}]+)\}\{([^{}]+)\}|(\d)(\d))")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (list of messages).

    For a list of messages the last message's ``content`` is used; content given as a list of
    parts joins their ``text`` fields. Anything else gives ``""``.
    """
    try:
        if isinstance(completion, str):
            return completion
        if isinstance(completion, dict):
            completion = [completion]
        if isinstance(completion, (list, tuple)) and completion:
            content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else ""
            if isinstance(content, str):
                return content
            if isinstance(content, (list, tuple)):
                parts = (p.get("text") for p in content if isinstance(p, dict))
                return "".join(t for t in parts if isinstance(t, str))
        return ""
    except Exception:  # noqa: BLE001 - rewards must never raise
        return ""


def _matching_braces(text: str) -> dict[int, int]:
    """Map each ``{`` to its matching ``}`` (unescaped braces only), in one linear pass."""
    matches: dict[int, int] = {}
    stack: list[int] = []
    for m in re.finditer(r"\\[{}]|[{}]", text):
        if len(m.group()) == 2:  # an escaped, literal brace
            continue
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            matches[stack.pop()] = m.start()
    return matches


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, else ``None``.

    Nested braces are kept (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); an unclosed box
    (a truncated completion) is skipped in favour of an earlier complete one. ``\\boxed 5``
    (no braces) gives ``5``.
    """
    if not isinstance(text, str):
        return None
    try:
        positions = sorted(
            (m.start(), m.end()) for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd) + r"(?![A-Za-z])", text)
        )
        if not positions:
            return None
        braces = _matching_braces(text)
        for _, end in reversed(positions):
            i = end
            while i < len(text) and text[i] in " \t":
                i += 1
            if i < len(text) and text[i] == "{":
                close = braces.get(i)
                if close is not None:
                    return text[i + 1 : close].strip()
            elif i > end:  # "\boxed 5": the argument is the next space-delimited token
                token = re.match(r"[^\s$]+", text[i:])
                if token:
                    return token.group().strip()
        return None
    except Exception:  # noqa: BLE001
        return None


def extract_answer(text: str) -> str | None:
    """The answer string of a completion (boxed, ``####``, "answer is", last number), else ``None``."""
    if not isinstance(text, str) or not text:
        return None
    try:
        text = text.replace("\u2212", "-")
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed
        for pattern in (_HASH_RE, _ANSWER_IS_RE):
            last = None
            for last in pattern.finditer(text):
                pass
            if last is not None:
                candidate = _first_number(last.group(1))
                if candidate is not None:
                    return candidate
        last = None
        for last in _SIGNED_NUMBER_RE.finditer(text):
            pass
        return last.group() if last is not None else None
    except Exception:  # noqa: BLE001
        return None


def _first_number(fragment: str) -> str | None:
    """The first numeric expression in a short fragment such as ``"$1,234.50 per day."``."""
    fragment = fragment[:200]
    frac = _FRAC_RE.search(fragment)
    number = _SIGNED_NUMBER_RE.search(fragment)
    if frac is not None and (number is None or frac.start() <= number.start() + len(number.group())):
        return frac.group()
    if number is None:
        return None
    slash = _SLASH_RE.match(fragment, number.start())
    return slash.group() if slash else number.group()


def _clean(text: str, strip_percent: bool) -> str:
    s = text.strip()
    for _ in range(3):  # unwrap nested \text{...} and the like
        s = _WRAPPER_RE.sub(r"\1", s)
    s = s.replace("\u2212", "-").replace("{,}", "").replace("\\$", "").replace("$", "")
    for space in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\left", "\\right", "\\displaystyle"):
        s = s.replace(space, "")
    if strip_percent:
        s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
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


def parse_number(text: Any, *, strip_percent: bool = True) -> Fraction | None:
    """The exact value of a numeric answer string, or ``None`` if it is not one.

    ``"$1,234.50."`` gives ``Fraction(2469, 2)``; ``"\\frac{1}{2}"`` and ``"1/2"`` give ``1/2``;
    ``"50\\%"`` gives ``50`` when ``strip_percent`` (else ``None``); ``"18 \\text{ apples}"``
    gives ``18`` (exactly one number in a non-numeric string); ``"3 or 4"`` gives ``None``.
    """
    if not isinstance(text, str) or not text:
        return None
    try:
        if len(text) > 10_000:
            return None
        s = _clean(text, strip_percent)
        value = _parse_clean(s)
        if value is not None:
            return value
        if not strip_percent and "%" in s:
            return None
        candidates = _SIGNED_NUMBER_RE.findall(s)
        if len(candidates) == 1 and "frac" not in s and "/" not in s:
            return _decimal(candidates[0].replace(" ", ""))
        return None
    except Exception:  # noqa: BLE001
        return None


def answers_match(predicted: Any, gold: Any, *, strip_percent: bool = True) -> bool:
    """True iff both strings parse to numbers (see :func:`parse_number`) of equal value."""
    a = parse_number(predicted, strip_percent=strip_percent)
    b = parse_number(gold, strip_percent=strip_percent)
    return a is not None and b is not None and a == b


def _gold_value(gold: Any) -> str | None:
    """Accept either a cleaned gold answer (``"72"``) or a raw GSM8K answer ending ``#### 72``."""
    if not isinstance(gold, str):
        gold = str(gold) if isinstance(gold, (int, float, Fraction)) else None
    if gold is None:
        return None
    if "####" in gold:
        gold = gold.rsplit("####", 1)[1]
    return gold.strip()


def score_completion(completion: Any, gold: Any, *, strip_percent: bool = True) -> float:
    """1.0 if the completion's extracted answer equals ``gold`` numerically, else 0.0. Never raises."""
    try:
        predicted = extract_answer(completion_text(completion))
        return 1.0 if answers_match(predicted, _gold_value(gold), strip_percent=strip_percent) else 0.0
    except Exception:  # noqa: BLE001
        return 0.0


def gsm8k_accuracy_reward(completions: Sequence[Any], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL-style reward function: ``1.0`` per completion whose answer equals its gold ``answer``.

    ``completions`` are strings or conversational message lists; ``answer`` is the dataset
    column (raw GSM8K ``... #### N`` or the cleaned ``N``), one per completion. Extra dataset
    columns arrive as ``kwargs`` and are ignored.
    """
    try:
        return [score_completion(c, g) for c, g in zip(completions, answer, strict=True)]
    except Exception:  # noqa: BLE001 - e.g. mismatched lengths: score what can be scored
        try:
            return [0.0] * len(completions)
        except Exception:  # noqa: BLE001
            return []


def boxed_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """``1.0`` per completion that contains a complete ``\\boxed{...}`` answer, else ``0.0``."""
    try:
        return [1.0 if extract_boxed(completion_text(c)) is not None else 0.0 for c in completions]
    except Exception:  # noqa: BLE001 - e.g. completions is not iterable
        return []
