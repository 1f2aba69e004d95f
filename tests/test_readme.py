"""The README's Python examples run as written, in order, in one namespace.

Blocks fenced as ``python`` run here; blocks fenced as ``py`` need the hub or a GPU and
are shown, not run. Runnable blocks import only the packages whose names are stable (the
top-level API and the subpackages below), so the README keeps working while modules move.
"""

import ast
import re

import pytest

from paths import REPO

README = REPO / "README.md"

# What a runnable README block may import from sparsejax.
STABLE = {"sparsejax", "sparsejax.models", "sparsejax.losses", "sparsejax.lora",
          "sparsejax.rewards", "sparsejax.data", "sparsejax.analysis", "sparsejax.trainers"}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def unstable_imports(source: str) -> list[str]:
    """sparsejax modules a block imports from outside :data:`STABLE`."""
    import sparsejax  # cheap: names resolve lazily

    def stable(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in STABLE - {"sparsejax"}) \
            or name == "sparsejax"

    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "sparsejax":
            # `from sparsejax import lora` names a subpackage, `... import random_mask` the API.
            names = [f"sparsejax.{a.name}" for a in node.names if a.name not in sparsejax.__all__]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        out += [n for n in names if n.split(".")[0] == "sparsejax" and not stable(n)]
    return out


def test_readme_python_blocks_import_stable_packages_only():
    blocks = python_blocks(README.read_text())
    assert blocks
    assert [name for block in blocks for name in unstable_imports(block)] == []


@pytest.mark.parametrize("source, bad", [
    ("from sparsejax import sampling", ["sparsejax.sampling"]),
    ("import sparsejax.rollouts", ["sparsejax.rollouts"]),
    ("from sparsejax.generation.rollouts import rollout", ["sparsejax.generation.rollouts"]),
    ("import sparsejax as sj\nfrom sparsejax import lora, losses, random_mask\n"
     "from sparsejax.models import apply", []),
])
def test_import_check(source, bad):
    assert unstable_imports(source) == bad


def test_readme_python_blocks_run():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # The optax example really moved the active entries and nothing else.
    sj, mask = namespace["sj"], namespace["mask"]
    assert sj.num_active(mask) == int(0.01 * 512 * 256) + int(0.01 * 256)
