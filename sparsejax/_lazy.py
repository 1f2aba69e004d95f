"""Package attributes imported on first use (PEP 562).

A package's ``__init__`` names what it exports and where each name lives; nothing is
imported until a name is used, so that importing a package (and every ``--help``) does
not pay for jax.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, namespace: dict[str, Any],
                 exports: Mapping[str, Sequence[str]]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package`` whose ``exports`` map a module
    (absolute name) to the names it provides; ``namespace`` is the package's globals.
    A submodule is also reachable as an attribute (``package.submodule``)."""
    where = {name: module for module, names in exports.items() for name in names}

    def getattr_(name: str) -> Any:
        if name not in where:
            # A submodule not imported yet (``package.module`` as an attribute).
            if importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(f"{package}.{name}")
        value = getattr(importlib.import_module(where[name]), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(where))

    return getattr_, dir_, sorted(where)
