"""``--config FILE.yaml``: settings from a file, and the run's resolved settings saved.

A config file is a YAML mapping whose keys are the flags' dests (the flag without ``--``,
with underscores: ``lr``, ``sparsity``, ``steps``, ``report_to``); a repeatable flag
(``reward``) takes a list. Precedence, lowest first: the dataclass defaults, the presets
of a job's ``--demo``, the file, the flags given on the command line. An unknown key or a
bad value is one line naming the key and the file (exit 2).

A run saves its resolved settings (every dest) as ``<out-dir>/config.yaml``;
``--config <out-dir>/config.yaml`` gives the same settings again.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sparsejax.cli.flags import FILE_SOURCES, dests, flag_spec

CONFIG_NAME = "config.yaml"
SETTINGS_KEYS = "_settings"  # namespace attribute: the dests a config.yaml holds
HEADER = ("# The resolved settings of this run; `--config {path}` runs it again (flags given\n"
          "# on the command line override them).\n")


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, metavar="FILE.yaml",
        help="read settings from a YAML mapping whose keys are the flags' names with "
             "underscores (lr: 1e-4); flags given here override it")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
          presets: Callable[[argparse.Namespace], Mapping[str, Any] | None] | None = None
          ) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``--config``: defaults < ``presets(args)`` (e.g.
    ``--demo``'s, None for none) < the file < the command line.

    The namespace also records which dests the file set (for messages naming the file)
    and the dests a saved ``config.yaml`` holds. A bad file exits 2 with one line.
    """
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            values = read(args.config, parser)
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
    # A repeated flag appends to its default, so the file's or the presets' list is set
    # after parsing, where the command line gives none.
    repeated = {d for d in dests(parser) if _is_append(parser, d)}
    plain = {d: v for d, v in values.items() if d not in repeated}
    if plain:
        parser.set_defaults(**plain)
        args = parser.parse_args(argv)
    extra = dict((presets(args) if presets is not None else None) or {})
    if extra:
        parser.set_defaults(**{**{k: v for k, v in extra.items() if k not in repeated},
                               **plain})
        args = parser.parse_args(argv)
    given = given_dests(parser, argv)
    for dest in repeated - given:
        for layer in (values, extra):
            if dest in layer:
                setattr(args, dest, None if layer[dest] is None else list(layer[dest]))
                break
    setattr(args, FILE_SOURCES, {d: args.config for d in values if d not in given})
    setattr(args, SETTINGS_KEYS, tuple(dests(parser)))
    return args


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests that ``argv`` sets on the command line."""
    unset = object()
    namespace = argparse.Namespace(**{d: None if _is_append(parser, d) else unset
                                      for d in dests(parser)})
    parsed = parser.parse_args(argv, namespace=namespace)
    return {d for d in dests(parser)
            if getattr(parsed, d) is not (None if _is_append(parser, d) else unset)}


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


def _is_append(parser: argparse.ArgumentParser, dest: str) -> bool:
    return isinstance(_action(parser, dest), argparse._AppendAction)


def read(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The settings of YAML file ``path`` by dest, each checked against its flag.

    Raises:
        ValueError: one line naming the file (and the key) for an unreadable file, a file
            that is not a mapping, an unknown key or a value of the wrong type or choice.
    """
    import yaml
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"--config {path}: not valid YAML{line}: "
                         f"{getattr(e, 'problem', None) or type(e).__name__}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"--config {path}: not a mapping of settings (key: value lines)")
    known = dests(parser)
    out = {}
    for key, value in doc.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            near = difflib.get_close_matches(dest, known, n=1)
            raise ValueError(f"{path}: unknown key {key!r}"
                             + (f" (did you mean {near[0]!r}?)" if near else ""))
        try:
            out[dest] = _value(parser, dest, value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {key}: {e}") from None
    return out


def _value(parser: argparse.ArgumentParser, dest: str, value: Any) -> Any:
    """``value`` from a file as the flag of ``dest`` would give it (raises ValueError)."""
    action = _action(parser, dest)
    spec = flag_spec(parser, dest)
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if value is None:
            return None
        return [_one(action, spec, item) for item in items]
    if isinstance(action, (argparse.BooleanOptionalAction,
                           argparse._StoreTrueAction)):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    return _one(action, spec, value)


KIND_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _one(action: argparse.Action, spec: Any, value: Any) -> Any:
    kind = spec.kind if spec is not None else str
    what = KIND_WORDS[kind]
    if value is None:
        if spec is not None and not spec.optional:
            raise ValueError(f"expected {what}, got null")
        return None
    if isinstance(value, str):
        try:
            value = spec.parse(value) if spec is not None else value
        except (TypeError, ValueError):
            raise ValueError(f"expected {what}, got {value!r}") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected {what}, got {value!r}")
    elif kind is float:
        value = float(value)
    elif kind is not int or not isinstance(value, int):
        raise ValueError(f"expected {what}, got {value!r}")
    if action.choices is not None and value is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved settings of a parsed command line: every dest of its parser (lists
    for repeated flags)."""
    keys = getattr(args, SETTINGS_KEYS, None)
    if keys is None:
        keys = [k for k in vars(args) if not k.startswith("_") and k != "config"]
    out = {}
    for key in keys:
        value = getattr(args, key)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def dump(args: argparse.Namespace, path: str) -> str:
    """The YAML text of ``args``'s settings, with a header naming ``path``."""
    import yaml
    return HEADER.format(path=path) + yaml.safe_dump(settings(args), sort_keys=False,
                                                     default_flow_style=False)


def save(args: argparse.Namespace, out_dir: str) -> str:
    """Writes ``<out_dir>/config.yaml`` (whole, temp + rename); returns its path. Call on
    process 0 after the run folder is locked."""
    from sparsejax.runs import run_dir
    path = os.path.join(out_dir, CONFIG_NAME)
    run_dir.atomic_write_text(path, dump(args, path))
    return path
