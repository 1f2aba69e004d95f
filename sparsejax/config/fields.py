"""Settings declared once: a dataclass field carries its default, its help and its choices.

:func:`setting` makes a dataclass field whose metadata the command line turns into a flag
(:mod:`sparsejax.cli.flags`): the flag's name (``--field-name`` unless ``flag`` says
otherwise), its type and default (the field's), its help and choices. Nothing here
imports more than the standard library, so that ``--help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None,
            flag: str | None = None, metavar: str | None = None, cli: bool = True) -> Any:
    """A dataclass field with its command-line description.

    Args:
      default: the default (an immutable value).
      help: one line for ``--help``.
      choices: the allowed values (from the library's own constants).
      flag: the flag's name without ``--`` (default: the field name with dashes).
      metavar: how ``--help`` shows the value.
      cli: False for a setting of the library alone (no flag).
    """
    meta = {"help": help, "choices": None if choices is None else tuple(choices),
            "flag": flag, "metavar": metavar, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: dataclasses.Field) -> str:
    """The command-line flag of a field: ``--learning-rate`` (or its metadata's ``flag``)."""
    return "--" + (field.metadata.get("flag") or field.name.replace("_", "-"))


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_range(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False,
                allow_none: bool = False) -> None:
    """Raises a one-line ValueError naming ``name`` unless ``value`` is a finite number
    in the range (``low``/``high`` inclusive unless ``*_open``), or None if allowed."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    bad = not math.isfinite(value)
    bad = bad or (low is not None and (value < low or (low_open and value == low)))
    bad = bad or (high is not None and (value > high or (high_open and value == high)))
    if not bad:
        return
    if isinstance(value, int) and high is None and low is not None and not low_open:
        raise ValueError(f"{name} must be >= {low:g}, got {value}")
    bounds = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", "
              + ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None
                                                            else "]"))
    raise ValueError(f"{name} must be a finite number in {bounds}, got {value}")


def check_fields(config: Any, rules: dict[str, dict[str, Any]]) -> None:
    """:func:`check_range` on each field named in ``rules`` (its keyword arguments)."""
    for name, rule in rules.items():
        check_range(name, getattr(config, name), **rule)
