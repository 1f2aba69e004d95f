"""Command-line flags generated from settings dataclasses, and the dataclasses built back.

Every setting is a dataclass field declared once with :func:`sparsejax.config.setting`
(its default, help, choices and flag name); :func:`add_flags` turns the fields of a
dataclass into an argument group:

* the flag is ``--field-name`` (or the metadata's ``flag``), its dest the flag with
  underscores (``--lr`` -> ``lr``), so a ``--config`` file names settings as the flags do;
* the type comes from the annotation: ``int``, ``float``, ``str``; ``X | None`` takes the
  word ``none`` for None; ``bool`` is ``--name`` / ``--no-name``; ``tuple[X, ...]`` is a
  flag that repeats (each use adds a value; the values given replace the default);
* the default, help and choices are the field's.

:func:`build` makes the dataclass from the parsed namespace; its ``__post_init__`` checks
the values, and a ``ValueError`` that names a field comes back naming its flag
(``learning_rate must be ...`` -> ``--lr must be ...``), or the key and file it came from
when a ``--config`` file set it. Standard library only: ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sparsejax.config.fields import flag_name

FILE_SOURCES = "_from_file"  # namespace attribute: dest -> the --config file that set it


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """How one dataclass field appears on the command line."""

    owner: type  # the dataclass
    field: str  # its field name
    flag: str  # "--lr"
    dest: str  # "lr": the argparse dest (and the key of a --config file)
    kind: type  # int, float, str or bool
    optional: bool  # X | None: the word "none" is None
    repeat: bool  # tuple[X, ...]: the flag repeats

    def parse(self, text: str) -> Any:
        """One command-line value (raises ValueError or TypeError if it is not one)."""
        if self.optional and text.strip().lower() == "none":
            return None
        if self.kind is bool:
            low = text.strip().lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            raise ValueError(text)
        return self.kind(text)


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a flag (all but metadata ``cli=False``)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


@functools.cache
def specs(cls: type) -> tuple[FlagSpec, ...]:
    """The :class:`FlagSpec` of each flag of dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in cli_fields(cls):
        kind, optional, repeat = _kind(hints[f.name], f"{cls.__name__}.{f.name}")
        flag = flag_name(f)
        out.append(FlagSpec(cls, f.name, flag, flag[2:].replace("-", "_"), kind, optional,
                            repeat))
    return tuple(out)


def _kind(hint: Any, where: str) -> tuple[type, bool, bool]:
    """``(kind, optional, repeat)`` of an annotation: int/float/str/bool, ``X | None``,
    ``tuple[X, ...]``."""
    optional = repeat = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(members) < len(typing.get_args(hint))
        if len(members) != 1:
            raise TypeError(f"{where}: a flag takes one type, not {hint}")
        hint = members[0]
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{where}: a repeated flag is tuple[X, ...], not {hint}")
        hint, repeat = args[0], True
    if hint not in (int, float, str, bool):
        raise TypeError(f"{where}: no flag for type {hint}")
    if hint is bool and (optional or repeat):
        raise TypeError(f"{where}: a bool flag is on or off (not {hint})")
    return hint, optional, repeat


def _parser_of(spec: FlagSpec) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return spec.parse(text)
    parse.__name__ = spec.kind.__name__  # argparse's "invalid float value: 'x'"
    return parse


class _RepeatAction(argparse._AppendAction):
    """``append``, but the first use replaces the default (a non-empty tuple) rather than
    adding to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest, None)
        items = [] if items is None or items is self.default else list(items)
        items.append(values)
        setattr(namespace, self.dest, items)


def _help(field: dataclasses.Field, spec: FlagSpec) -> str:
    text = field.metadata.get("help") or ""
    default = field.default
    if spec.repeat and default not in (None, ()) and "default" not in text:
        text += f" (default: {' '.join(map(str, default))})"
    elif (spec.kind is not bool and not spec.repeat and default not in (None, "")
            and "default" not in text):
        text += f" (default: {default})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str | None = None, *,
              groups: Mapping[type, str] | None = None, skip: Iterable[str] = ()
              ) -> dict[str, FlagSpec]:
    """Adds a flag for each field of dataclass ``cls`` (but ``skip``) to ``parser``.

    The flags go to an argument group ``title`` (default: the class name); fields that
    ``cls`` inherits from a class in ``groups`` go to a group of that title instead.
    Returns the specs by dest.
    """
    groups = dict(groups or {})
    skip = set(skip)
    chosen = [s for s in specs(cls) if s.field not in skip]
    where = {}
    for spec in chosen:
        owner = next((k for k in cls.__mro__ if spec.field in vars(k).get("__annotations__", {})),
                     cls)
        where[spec.dest] = groups.get(owner, title or cls.__name__)
    order = sorted(set(where.values()), key=lambda n: (n != (title or cls.__name__),
                                                       list(where.values()).index(n)))
    made = {name: parser.add_argument_group(name) for name in order}
    added = {}
    for spec in chosen:
        name = where[spec.dest]
        field = cls.__dataclass_fields__[spec.field]
        kw: dict[str, Any] = {"dest": spec.dest, "help": _help(field, spec)}
        if field.metadata.get("choices") is not None:
            kw["choices"] = list(field.metadata["choices"])
        if field.metadata.get("metavar"):
            kw["metavar"] = field.metadata["metavar"]
        if spec.repeat:
            if not (field.default is None or isinstance(field.default, tuple)):
                raise TypeError(f"{cls.__name__}.{spec.field}: a repeated flag's default is "
                                "None or a tuple")
            kw.update(action=_RepeatAction,
                      type=_parser_of(dataclasses.replace(spec, repeat=False)),
                      default=field.default)
        elif spec.kind is bool:
            kw.update(action=argparse.BooleanOptionalAction, default=field.default)
        else:
            kw.update(type=_parser_of(spec), default=field.default)
        action = made[name].add_argument(spec.flag, **kw)
        action.flag_spec = spec  # what a --config file's value is checked against
        added[spec.dest] = spec
    return added


def field_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of the flags of ``cls`` in ``args`` (a repeated flag's list as a
    tuple; fields without a flag keep their defaults)."""
    out = {}
    for spec in specs(cls):
        value = getattr(args, spec.dest)
        out[spec.field] = tuple(value) if spec.repeat and value is not None else value
    return out


def build(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """``cls(**{field: args.<dest>})`` (``values`` override); a ValueError of its checks
    comes back as one line naming the flag (or the ``--config`` key and file)."""
    try:
        return cls(**{**field_values(cls, args), **values})
    except ValueError as e:
        raise ValueError(flag_message(str(e), [cls], getattr(args, FILE_SOURCES, None))
                         ) from None


def flag_message(message: str, classes: Iterable[type],
                 from_file: Mapping[str, str] | None = None) -> str:
    """``message`` with each field name of ``classes`` (or its dest) replaced by its flag,
    or by ``key (in FILE)`` where a ``--config`` file gave the value."""
    from_file = from_file or {}
    names: dict[str, str] = {}
    for cls in classes:
        for spec in specs(cls):
            label = (f"{spec.dest} (in {from_file[spec.dest]})" if spec.dest in from_file
                     else spec.flag)
            names.setdefault(spec.field, label)
            names.setdefault(spec.dest, label)
    if not names:
        return message
    pattern = re.compile(r"(?<![\w-])(" + "|".join(
        re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")(?![\w'-])")
    # Quoted values ('seed' in "got 'seed'") are not names.
    parts = re.split(r"""((?<!\w)'[^']*'|(?<!\w)"[^"]*")""", message)
    return "".join(part if i % 2 else pattern.sub(lambda m: names[m.group(1)], part)
                   for i, part in enumerate(parts))


def dests(parser: argparse.ArgumentParser) -> list[str]:
    """The settings of ``parser``: every dest but ``help`` and ``config``."""
    return [a.dest for a in parser._actions
            if a.dest not in ("help", "config") and a.dest != argparse.SUPPRESS]


def flag_spec(parser: argparse.ArgumentParser, dest: str) -> FlagSpec | None:
    for action in parser._actions:
        if action.dest == dest:
            return getattr(action, "flag_spec", None)
    return None
