"""Where a result comes from: the commit of the checkout that produced it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def git_commit(short: bool = False) -> str:
    """The checkout's ``HEAD`` (``-dirty`` with uncommitted changes to tracked files),
    ``$SPARSEJAX_COMMIT`` when set (a copy of the tree without ``.git``), else
    ``"unknown"``."""
    if os.environ.get("SPARSEJAX_COMMIT"):
        return os.environ["SPARSEJAX_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
                             cwd=_PACKAGE, capture_output=True, text=True, check=True,
                             timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=_PACKAGE, capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")
