"""Answer extraction from completions: ``\\boxed{}``, ``####``, "the answer is", the last number.

A completion's answer is taken from, in order of preference:

1. the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, nested braces allowed;
2. the last ``#### N`` (GSM8K's own answer marker);
3. the last "answer is N" / "answer: N" phrase (case-insensitive);
4. the last number in the text.

Guarantees, for any input (non-strings, empty or multi-megabyte strings included):

* nothing raises and nothing is evaluated;
* time is linear in the text length, and bounded: only the last :data:`MAX_SCAN_CHARS` characters
  are searched (a final answer is at the end; no sampler emits a megabyte per completion).
  Within them every pattern has bounded repetitions or is matched once from a known position,
  and no scan restarts from an earlier position (1 MB of adversarial text takes about 0.1-0.2 s
  on a 2-core CPU, 10 MB no more; see ``tests/rewards/test_rewards.py``);
* numbers are ASCII digits only: Arabic-Indic (``٧٢``) or fullwidth (``７２``) digits are not
  numbers, and a number never starts or ends next to such a digit;
* a minus is a sign only where it cannot be a subtraction: directly before the digits and not
  after a digit, a closing bracket, or a word character, spaces skipped (``"16 - 3 - 4"`` ends in
  ``4``, ``"= -4"`` and ``"fell to -4"`` in ``-4``; a hyphen directly after a letter, as in
  ``"x-4"``, is not a sign).
"""

from __future__ import annotations

import collections
import re
from typing import Any

__all__ = ["MAX_SCAN_CHARS", "NUMBER_PATTERN", "completion_text", "extract_answer", "extract_boxed", "last_number"]

MAX_SCAN_CHARS = 1_000_000
"""Only this many characters at the end of a completion are searched for its answer."""

_BOX_COMMANDS_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"\\[{}]|[{}]")
_TOKEN_RE = re.compile(r"(?!\\(?:boxed|fbox)(?![A-Za-z]))[^\s$]{1,1000}")

# ASCII digits only; never adjacent to a digit of any script (``\d`` is Unicode here).
NUMBER_PATTERN = r"(?<!\d)(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?!\d)"
"""Regex of an unsigned numeral: ``1,234.5``, ``12``, ``0.5``, ``.5`` (ASCII digits, no other digit beside)."""
_NUMBER_RE = re.compile(rf"(?:(?<![\w)\]}}.])-)?{NUMBER_PATTERN}")
_HASH_RE = re.compile(r"####")
_ANSWER_IS_RE = re.compile(r"answer[ \t]{0,8}(?:is|was|=|:)[ \t:]{0,8}", re.IGNORECASE)
_FRAC_RE = re.compile(r"-?(?:[0-9]{1,64})?\\[dt]?frac(?:\{[^{}]{1,64}\}\{[^{}]{1,64}\}|[0-9][0-9])")
_SLASH_RE = re.compile(r"/(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?![0-9])")
_FRAGMENT_CHARS = 200


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
    except Exception:
        return ""


def _matching_braces(text: str) -> dict[int, int]:
    """Map each ``{`` to its matching ``}`` (unescaped braces only), in one linear pass."""
    matches: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text):
        if len(m.group()) == 2:  # an escaped, literal brace
            continue
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            matches[stack.pop()] = m.start()
    return matches


def extract_boxed(text: Any) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, else ``None``.

    Nested braces are kept (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); an unclosed box
    (a truncated completion) is skipped in favour of an earlier complete one. ``\\boxed 5``
    (no braces) gives ``5``. Linear time: each candidate is examined in O(1) from its position,
    and only the returned one is sliced.
    """
    if not isinstance(text, str):
        return None
    try:
        text = text[-MAX_SCAN_CHARS:]
        ends = [m.end() for m in _BOX_COMMANDS_RE.finditer(text)]
        if not ends:
            return None
        braces: dict[int, int] | None = None
        n = len(text)
        for end in reversed(ends):
            i = end
            while i < n and text[i] in " \t":  # spaces up to the next command: linear overall
                i += 1
            if i < n and text[i] == "{":
                if braces is None:
                    braces = _matching_braces(text)
                close = braces.get(i)
                if close is not None:
                    return text[i + 1 : close].strip()
            elif i > end:  # "\boxed 5": the argument is the next space-delimited token
                token = _TOKEN_RE.match(text, i)
                if token:
                    return token.group().strip()
        return None
    except Exception:
        return None


def _is_subtraction(text: str, minus: int) -> bool:
    """True if the ``-`` at ``minus`` follows a digit or closing bracket (spaces skipped)."""
    i = minus - 1
    while i >= 0 and minus - i <= 64 and text[i] in " \t":
        i -= 1
    return i >= 0 and (text[i] in "0123456789)]}.%" or text[i].isdigit())


def _signed(text: str, m: re.Match) -> str:
    number = m.group()
    if number.startswith("-") and _is_subtraction(text, m.start()):
        return number[1:]
    return number


def last_number(text: Any) -> str | None:
    """The last number in ``text`` (with its sign, if the minus cannot be a subtraction), else ``None``."""
    if not isinstance(text, str):
        return None
    try:
        text = text[-MAX_SCAN_CHARS:]
        last = _last_match(_NUMBER_RE, text)
        return _signed(text, last) if last is not None else None
    except Exception:
        return None


def _first_number(fragment: str) -> str | None:
    """The first numeric expression of a short fragment: ``"$1,234.50 per day."``, ``3/4``, ``\\frac{1}{2}``."""
    frac = _FRAC_RE.search(fragment)
    number = _NUMBER_RE.search(fragment)
    if frac is not None and (number is None or frac.start() <= number.end()):
        return frac.group()
    if number is None:
        return None
    slash = _SLASH_RE.match(fragment, number.end())
    return _signed(fragment, number) + (slash.group() if slash else "")


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """The last match of ``pattern`` in ``text`` (linear time, one match kept)."""
    return next(iter(collections.deque(pattern.finditer(text), maxlen=1)), None)


def _after_last(pattern: re.Pattern, text: str) -> str | None:
    last = _last_match(pattern, text)
    if last is None:
        return None
    fragment = text[last.end() : last.end() + _FRAGMENT_CHARS]
    return fragment.split("\n", 1)[0]


def extract_answer(text: Any) -> str | None:
    """The answer string of a completion (boxed, ``####``, "answer is", last number), else ``None``."""
    if not isinstance(text, str) or not text:
        return None
    try:
        text = text[-MAX_SCAN_CHARS:].replace("\u2212", "-")
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed
        for pattern in (_HASH_RE, _ANSWER_IS_RE):
            fragment = _after_last(pattern, text)
            if fragment is not None:
                candidate = _first_number(fragment)
                if candidate is not None:
                    return candidate
        return last_number(text)
    except Exception:
        return None
