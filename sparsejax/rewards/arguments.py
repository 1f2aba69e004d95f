"""What a reward function is called with: the batch, the data's columns and the prompts.

A reward is always called with the completions and their gold answers as its first two
(positional) arguments. Besides those, the GRPO trainer has keyword arguments for it, one
value per completion, in the order of the completions:

* ``prompts``: the text of the prompt each completion answers (as the model read it, chat
  template included), repeated for each completion of a prompt;
* ``completion_ids``: the token ids of each completion;
* every column of the data (:func:`sparsejax.data.dataset.read_prompt_data` keeps them all:
  ``question``, ``answer``, ``difficulty``...), each prompt's row repeated likewise.

A function gets the ones it asks for: all of them if it takes ``**kwargs``, else those it
names as parameters (so ``reward(completions, answers)`` keeps working). A parameter without
a default that names no available argument is a one-line ``ValueError`` naming it and the
available ones (:func:`check_reward_arguments` raises it before any training).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["RESERVED_ARGUMENTS", "call_reward", "check_columns", "check_reward_arguments",
           "repeat_rows", "reward_keywords"]

RESERVED_ARGUMENTS = ("completions", "answers", "prompts", "completion_ids")
"""Argument names the trainer fills itself; a data column cannot take one of them."""

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def reward_keywords(fn: Callable) -> tuple[frozenset[str] | None, frozenset[str], frozenset[str]]:
    """``(accepted, required, positional)`` keyword names of a reward function.

    ``accepted`` is ``None`` when ``fn`` takes ``**kwargs`` (every keyword is welcome);
    ``required`` the parameters after the first two that have no default; ``positional``
    the names of the first two parameters (they receive the completions and the answers,
    so a keyword of that name is never passed). A callable without a signature accepts
    none.
    """
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return frozenset(), frozenset(), frozenset()
    positional, accepted, required, var_keyword = set(), set(), set(), False
    taken = 0  # positional slots given to (completions, answers)
    for p in parameters:
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            taken = 2
        elif p.kind in _POSITIONAL and taken < 2:
            taken += 1
            positional.add(p.name)
        elif p.kind == inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif p.kind != inspect.Parameter.POSITIONAL_ONLY:
            accepted.add(p.name)
            if p.default is inspect.Parameter.empty:
                required.add(p.name)
        elif p.default is inspect.Parameter.empty:
            required.add(p.name)  # positional-only past the answers: never fillable
    return (None if var_keyword else frozenset(accepted)), frozenset(required), frozenset(positional)


def _missing(fn: Callable, available: Sequence[str]) -> list[str]:
    _, required, _ = reward_keywords(fn)
    return sorted(required - set(available))


def _missing_error(name: str, missing: Sequence[str], available: Sequence[str]) -> ValueError:
    names = ", ".join(repr(m) for m in missing)
    return ValueError(f"reward {name!r}: no column {names} for its parameter"
                      f"{'s' if len(missing) > 1 else ''}; available: "
                      f"{', '.join(sorted(available)) or 'none'}.")


def check_reward_arguments(fn: Callable, available: Sequence[str], name: str | None = None) -> None:
    """Raises a one-line ``ValueError`` if ``fn`` needs a keyword not in ``available``.

    ``available`` are the keyword names it will be called with (``prompts``,
    ``completion_ids`` and the column names). A reward with ``check_arguments`` (a
    :class:`sparsejax.rewards.CombinedReward`) checks each of its terms.
    """
    check = getattr(fn, "check_arguments", None)
    if callable(check):
        check(available)
        return
    missing = _missing(fn, available)
    if missing:
        raise _missing_error(name or getattr(fn, "__name__", type(fn).__name__), missing, available)


def call_reward(fn: Callable, completions: Sequence[Any], answers: Sequence[Any],
                kwargs: Mapping[str, Any] | None = None, name: str | None = None) -> Any:
    """``fn(completions, answers, **the kwargs it accepts)``; its result unchecked.

    Raises:
        ValueError: (one line) if ``fn`` has a required parameter that ``kwargs`` do not fill.
    """
    kwargs = kwargs or {}
    accepted, required, positional = reward_keywords(fn)
    missing = sorted(required - set(kwargs))
    if missing:
        raise _missing_error(name or getattr(fn, "__name__", type(fn).__name__), missing, list(kwargs))
    if accepted is None:
        passed = {k: v for k, v in kwargs.items() if k not in positional}
    else:
        passed = {k: v for k, v in kwargs.items() if k in accepted}
    return fn(completions, answers, **passed)


def check_columns(columns: Mapping[str, Sequence[Any]] | None, n: int, what: str = "columns"
                  ) -> dict[str, list[Any]]:
    """``columns`` (name -> one value per prompt) as a dict of lists; ``{}`` for ``None``.

    Raises:
        ValueError: (one line) for a column that is not a list of ``n`` values, a name that
            is not a non-empty string, or one of :data:`RESERVED_ARGUMENTS`.
    """
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise ValueError(f"{what}: expected a mapping of column name to values, got "
                         f"{type(columns).__name__}.")
    out = {}
    for key, values in columns.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{what}: column names must be non-empty strings, got {key!r}.")
        if key in RESERVED_ARGUMENTS:
            raise ValueError(f"{what}: column {key!r} has the name of a reward argument "
                             f"({', '.join(RESERVED_ARGUMENTS)}); rename it.")
        try:
            if isinstance(values, (str, bytes, Mapping)):
                raise TypeError
            values = list(values)
        except TypeError:
            raise ValueError(f"{what}: column {key!r} is {type(values).__name__}; expected one "
                             f"value per prompt ({n}).") from None
        if len(values) != n:
            raise ValueError(f"{what}: column {key!r} has {len(values)} values; expected one per "
                             f"prompt ({n}).")
        out[key] = values
    return out


def repeat_rows(columns: Mapping[str, Sequence[Any]], rows: Sequence[int], repeat: int = 1
                ) -> dict[str, list[Any]]:
    """Each column's values at ``rows``, each repeated ``repeat`` times in a row (prompt-major,
    the order of a GRPO step's completions)."""
    return {k: [v[i] for i in rows for _ in range(repeat)] for k, v in columns.items()}
