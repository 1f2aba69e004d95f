"""XLA options a training process needs before JAX starts its backends.

XLA's CPU pipeline removes optimization barriers before common-subexpression
elimination, so the forward pass that a rematerialized layer recomputes in the backward
is merged back into the original one: on a CPU, ``remat="layer"`` keeps every layer's
activations (no memory saved; a Qwen2.5-0.5B full-finetuning micro-batch of 4 x 352
tokens plans 6.3 GiB of temporaries instead of 1.8 GiB). XLA's GPU pipeline keeps the
barriers until after that pass, so remat works there as written. On a CPU,
:func:`keep_optimization_barriers` turns the early removal off (the barriers then stay
to the end, as on a GPU); the values computed are those of the same program.

XLA reads ``XLA_FLAGS`` once, when the first backend starts (the first computation or
device query, not ``import jax``), so call this first thing in a process.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

KEEP_BARRIERS_FLAG = "--xla_disable_hlo_passes=cse_barrier_expander"
_GPU_WORDS = ("cuda", "rocm", "gpu")


def runs_on_cpu() -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` names only ``cpu``, or no GPU
    plugin of JAX (a ``jax_plugins`` entry point or module) is installed. Starts no
    backend."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"]
    names = [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("jax_plugins") is not None:
        import pkgutil

        import jax_plugins
        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    return not any(word in name.lower() for name in names for word in _GPU_WORDS)


def keep_optimization_barriers() -> bool:
    """On a CPU, adds :data:`KEEP_BARRIERS_FLAG` to ``XLA_FLAGS`` (so that remat saves
    memory there, see the module docstring); returns whether the flag is now set. A
    no-op on a GPU, or when ``XLA_FLAGS`` already disables any HLO passes (the user's
    choice stands); effective only before JAX's backends start."""
    flags = os.environ.get("XLA_FLAGS", "")
    if KEEP_BARRIERS_FLAG in flags.split():
        return True
    if not runs_on_cpu() or "--xla_disable_hlo_passes" in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {KEEP_BARRIERS_FLAG}".strip()
    return True
