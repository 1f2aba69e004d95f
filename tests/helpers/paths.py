"""Where the tests find the repository, the shared data and their own fixtures."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository root (pyproject.toml, sparsejax/, kernels/, experiments/)."""

SHARED = REPO.parent / "shared"
"""Data the tests read beside the repository: tokenizers, tiny real models, datasets."""

TEST_DATA = Path(__file__).resolve().parent / "data"
"""The tests' own small data files."""
