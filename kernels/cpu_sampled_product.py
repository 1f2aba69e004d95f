"""The sampled dense-dense product as a C++ kernel for the CPU (an XLA FFI custom call).

``sampled_product(x, dy, a, b)[j] = sum_t x[t, a[j]] * dy[t, b[j]]`` in float32, for
token-major ``x [T, in]`` and ``dy [T, out]`` (float32 or bfloat16) and the ``(k,)``
int32 coordinates of the active entries: the weight gradient of ``y = x @ W`` at the
active entries of ``W [in, out]``. The source is ``sampled_product_cpu.cc`` next to
this file (its header comment gives the plan). XLA's own gather runs about one
element per nanosecond on a CPU, so at 1% density :func:`sparsejax.backends.xla_sampled_product`
costs about as much as the dense weight gradient; this kernel reads every operand
value once per token tile, from cache.

The kernel is compiled on first use with the system C++ compiler (``$CXX``, else
``g++``, else ``c++``) against the XLA FFI headers that ship with jaxlib, for the
machine it runs on (``-march=native``), and cached under
``$SPARSEJAX_CACHE_DIR`` (default ``~/.cache/sparsejax``) by a key of the source,
compiler, flags, jaxlib version and CPU. :func:`available` is False (and the callers
fall back to XLA) when there is no compiler, the build fails, or
``SPARSEJAX_CPU_KERNELS=0``; the first failure is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

__all__ = ["TARGET", "available", "sampled_product"]

TARGET = "sparsejax_sampled_product"
_SOURCE = Path(__file__).with_name("sampled_product_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_BUILD_TIMEOUT_S = 300
_log = logging.getLogger(__name__)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """The CPU's feature flags (``-march=native`` builds for them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("SPARSEJAX_CACHE_DIR") or Path.home() / ".cache" / "sparsejax"
    return Path(root) / "cpu_kernels"


def _build(compiler: str) -> Path:
    """The shared library, compiled into the cache unless it is there already."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout.splitlines()[:1]
    key = hashlib.sha256("\n".join([
        _SOURCE.read_text(), compiler, *version, *_FLAGS, jaxlib.__version__,
        _cpu_signature()]).encode()).hexdigest()[:20]
    lib = _cache_dir() / f"sampled_product_{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        built = Path(tmp) / lib.name
        cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(built)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(built, lib)  # atomic: concurrent builders leave one complete file
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU (once per process)."""
    if os.environ.get("SPARSEJAX_CPU_KERNELS", "1") == "0":
        return False
    compiler = _compiler()
    if compiler is None:
        _log.warning("sparsejax: no C++ compiler found; the sparse backward uses XLA's "
                     "gather on the CPU (slower)")
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SparsejaxSampledProduct),
                                    platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        _log.warning("sparsejax: the CPU sampled-product kernel is unavailable (%s); "
                     "the sparse backward uses XLA's gather (slower)", e)
        return False
    return True


def sampled_product(x: jax.Array, dy: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``out[j] = sum_t x[t, a[j]] * dy[t, b[j]]`` (float32) with the C++ kernel.

    ``x [T, in]`` and ``dy [T, out]`` are float32 or bfloat16, ``a, b`` ``(k,)`` int32
    coordinates in range (an entry out of range is an error, not a silent read).
    Sums run over token tiles in a fixed order, independent of the thread count; they
    agree with the XLA path to float32 rounding, not bitwise. Call only when
    :func:`available` is True, on the CPU.
    """
    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"x {x.shape} and dy {dy.shape} must be [T, in] and [T, out]")
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a {a.shape} and b {b.shape} must be equal (k,) vectors")
    ok = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    if jnp.dtype(x.dtype) not in ok or jnp.dtype(dy.dtype) not in ok:
        raise ValueError(f"x and dy must be float32 or bfloat16, got {x.dtype}, {dy.dtype}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(a.shape, jnp.float32),
                            vmap_method="sequential")
    return call(x, dy, a.astype(jnp.int32), b.astype(jnp.int32))
