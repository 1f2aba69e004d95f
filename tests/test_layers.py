"""The package's layers: no import cycles, and no layer imports a layer above it.

Read from the source (every ``import`` of sparsejax, also those inside functions, but
not those under ``if TYPE_CHECKING:``), without importing anything; plus a check that the
model imports nothing of the optimizer or the masks at run time.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from paths import REPO

ROOT = REPO

# Lowest first. A module may import its own layer and the layers below it.
LAYERS: list[tuple[str, ...]] = [
    ("sparsejax._lazy", "sparsejax.types", "sparsejax.config",  # stdlib only
     "sparsejax.xla_flags"),
    ("sparsejax.masks", "sparsejax.parallel"),      # masks; mesh and layout rules
    ("sparsejax.models",),                          # the decoder: no optimizer, no masks
    ("sparsejax.optim.adamw_math",),                # the AdamW arithmetic (kernels' contract)
    ("sparsejax.backends", "sparsejax.kernels"),
    ("sparsejax.optim",),
    ("sparsejax.sparse_backward", "sparsejax.generation", "sparsejax.losses",
     "sparsejax.rewards"),
    ("sparsejax.data", "sparsejax.lora", "sparsejax.analysis", "sparsejax.demo"),
    ("sparsejax.trainable",),                       # what trains
    ("sparsejax.runs",),                            # the run and its loop
    ("sparsejax.trainers",),
    ("sparsejax.cli",),
    ("sparsejax",),                                 # the top-level API
]


def module_files() -> dict[str, Path]:
    """Module name -> source file, for sparsejax and kernels/ (as sparsejax.kernels)."""
    out = {}
    for base, package in ((ROOT / "sparsejax", "sparsejax"), (ROOT / "kernels", "sparsejax.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, index = len(p), i
    assert index is not None, f"{module} is in no layer of LAYERS"
    return index


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The sparsejax modules ``module`` imports (a name imported from a package is the
    submodule when one has that name, else the package)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and _type_checking_only(node) for n in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "sparsejax" or n.startswith("sparsejax."))
    return {n for n in out if n != module}


def graph() -> dict[str, set[str]]:
    files = module_files()
    modules = set(files)
    return {m: {n for n in imports_of(m, p, modules) if n in modules} for m, p in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer_of(m)}) imports {n} (layer {layer_of(n)})"
                  for m, targets in edges.items() for n in targets
                  if layer_of(n) > layer_of(m))


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_layer_imports_a_layer_above_it():
    assert upward(graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    edges = {"sparsejax.masks.core": {"sparsejax.masks.io"},
             "sparsejax.masks.io": {"sparsejax.masks.core"},
             "sparsejax.models.decoder": {"sparsejax.optim.sparse"}}
    assert cycles(edges) == [["sparsejax.masks.core", "sparsejax.masks.io"]]
    assert upward(edges) == ["sparsejax.models.decoder (layer 2) imports "
                             "sparsejax.optim.sparse (layer 5)"]


def test_imports_are_read_from_the_source(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "from sparsejax.masks import core, num_active\n"
                   "if TYPE_CHECKING:\n    from sparsejax.trainers import grpo\n"
                   "def f():\n    import sparsejax.optim.sparse\n")
    got = imports_of("sparsejax.x", src, {"sparsejax.masks", "sparsejax.masks.core",
                                          "sparsejax.optim.sparse"})
    assert got == {"sparsejax.masks.core", "sparsejax.masks", "sparsejax.optim.sparse"}


@pytest.mark.parametrize("module, absent", [
    ("sparsejax.models.decoder", ("sparsejax.optim", "sparsejax.masks", "sparsejax.trainable")),
    ("sparsejax.config", ("jax", "numpy")),
])
def test_importing_a_layer_pulls_in_nothing_above_it(module, absent):
    code = (f"import sys, {module}\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'sparsejax' "
            f"or m in ('jax', 'numpy')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout
    for name in absent:
        assert f"'{name}'" not in loaded and f"'{name}." not in loaded, (name, loaded)
