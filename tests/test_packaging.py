"""Packaging: every package is installed, and kernels/ installs as sparsejax.kernels
without ever shadowing the top-level ``kernels`` distribution (a transformers dependency)."""

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from paths import REPO
from tiny_models import save_tiny_qwen2

ROOT = REPO


def _python(code: str, cwd: Path, *flags: str) -> list[str]:
    """Run ``code`` in a fresh interpreter in ``cwd``; its stdout lines."""
    run = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()


def _distribution_has(file: str) -> bool:
    """Whether ``file`` is one of the installed ``kernels`` distribution's files."""
    dist = importlib.metadata.distribution("kernels")
    return any(Path(dist.locate_file(f)).resolve() == Path(file).resolve()
               for f in dist.files or ())


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "sparsejax").rglob("__init__.py")}
    found.add("sparsejax.kernels")
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert all((ROOT / "sparsejax" / Path(*p.split(".")[1:]) / "__init__.py").exists()
               or p in ("sparsejax", "sparsejax.kernels") for p in listed), listed


def test_sparsejax_kernels_is_this_repository_kernels_folder(tmp_path):
    """Outside the repository, ``sparsejax.kernels`` is kernels/ and sparsejax adds no
    top-level ``kernels`` (wherever the virtual environment lives)."""
    code = ("import importlib.util\n"
            "import sparsejax.kernels.indexed_adamw as m\n"
            "print(m.__file__)\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(spec.origin if spec else 'NONE')\n")
    kernel_file, top_level = _python(code, tmp_path, "-I")
    assert Path(kernel_file).resolve() == ROOT / "kernels" / "indexed_adamw.py"
    assert Path(top_level).resolve() != ROOT / "kernels" / "__init__.py"


@pytest.mark.slow
def test_transformers_loads_a_model_from_the_repository_root(tmp_path):
    """Python started in the repository root (a REPL, ``python -c``, ``python -m pytest``)
    has the root first on ``sys.path``; ``import kernels`` must still give the installed
    distribution, so that transformers' model code imports, while ``sparsejax.kernels``
    stays this repository's."""
    folder = save_tiny_qwen2(tmp_path / "model")
    code = ("import sys, kernels\n"
            "print(sys.path[0] == '')\n"
            "print(kernels.__file__)\n"
            "import sparsejax.kernels\n"
            "print(sparsejax.kernels.__file__)\n"
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
            "print(type(model).__name__)\n")
    on_path, top_level, ours, model = _python(code, ROOT)
    assert on_path == "True"
    assert _distribution_has(top_level), top_level
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert model == "Qwen2ForCausalLM"


def test_without_the_distribution_import_kernels_fails_from_the_root():
    """With no ``kernels`` installed, ``import kernels`` in the repository root fails as
    it would anywhere else, rather than giving sparsejax's kernels."""
    code = ("import sys\n"
            "sys.path[:] = [p for p in sys.path if 'packages' not in p]\n"
            "try:\n"
            "    import kernels\n"
            "    print(kernels.__file__)\n"
            "except ModuleNotFoundError as e:\n"
            "    print('missing', e.name, 'kernels' in sys.modules)\n")
    assert _python(code, ROOT) == ["missing kernels False"]


def test_python_version():
    assert sys.version_info >= (3, 11)
