"""Packaging: every package is installed, and kernels/ installs as sparsejax.kernels."""

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "sparsejax").rglob("__init__.py")}
    found.add("sparsejax.kernels")
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert all((ROOT / "sparsejax" / Path(*p.split(".")[1:]) / "__init__.py").exists()
               or p in ("sparsejax", "sparsejax.kernels") for p in listed), listed


def test_python_version():
    assert sys.version_info >= (3, 11)
