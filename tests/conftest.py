"""One persistent JAX compilation cache for the whole test run.

Most of the suite's time on a CPU is XLA compilation, and many tests compile the same
programs (the same tiny models, losses and optimizer steps, built afresh in each test).
The cache lives in a temporary folder made when the run starts: pytest-xdist's workers
inherit it through the environment, so a program compiled by one worker is loaded by the
others, and nothing outlives the run. Setting ``JAX_COMPILATION_CACHE_DIR`` yourself
keeps your folder instead. Subprocesses the tests start (the command-line jobs) inherit it
too. The cache changes speed only: a loaded executable is the one XLA compiled.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_OWNED_CACHE: str | None = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWNED_CACHE = tempfile.mkdtemp(prefix="sparsejax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWNED_CACHE
    # Cache every program, however quick its compilation: the suite's are mostly small.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    # Only the process that made the folder removes it (xdist workers inherit the variable,
    # so for them the folder is not their own).
    if _OWNED_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWNED_CACHE, ignore_errors=True)
