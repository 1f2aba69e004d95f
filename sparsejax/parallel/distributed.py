"""Many processes (hosts): starting ``jax.distributed`` and who writes what.

A run launched as several processes (one per host, or one per GPU) calls
:func:`initialize` first, before any JAX computation. It starts
``jax.distributed`` when the launch asks for it:

* flags (``--coordinator-address host:port --num-processes N --process-id i``) or the
  same values in ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``;
* a SLURM job step or an Open MPI launch with more than one task, which
  ``jax.distributed.initialize()`` detects by itself;
* otherwise nothing happens (one process: every helper here answers as process 0).

After it, ``jax.devices()`` lists every process's devices and a mesh over them spans the
hosts. On CPU the processes talk through gloo (``jax_cpu_collectives_implementation``,
JAX's default since 0.5; set here where it is unset).

Who writes what (see the README's "Many devices" section): process 0 (:func:`is_main`)
alone writes metrics, plots, evaluations, the final model and ``finished.json``; every
process writes its own shards of each checkpoint.
"""

from __future__ import annotations

import os
import sys

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _cluster_tasks() -> int:
    """Tasks of a SLURM step or an Open MPI launch (1 when neither)."""
    for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        n = _int(os.environ.get(var), var)
        if n is not None:
            return n
    return 1


def launch_settings(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None) -> dict | None:
    """The ``jax.distributed.initialize`` arguments a launch asks for (flags first, then
    ``JAX_*`` variables), ``{}`` for a cluster launch JAX detects itself, or None for a
    single process.

    Raises:
        ValueError: a bad or incomplete setting (names the flag and its variable).
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    n = _int(num_processes if num_processes is not None
             else os.environ.get("JAX_NUM_PROCESSES"), "--num-processes (JAX_NUM_PROCESSES)")
    i = _int(process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID"),
             "--process-id (JAX_PROCESS_ID)")
    if coordinator is None and n is None and i is None:
        return {} if _cluster_tasks() > 1 else None
    if n is not None and n < 1:
        raise ValueError(f"--num-processes (JAX_NUM_PROCESSES) must be >= 1, got {n}")
    if n == 1 and coordinator is None and i in (None, 0):
        return None
    if i is not None and (i < 0 or (n is not None and i >= n)):
        raise ValueError(f"--process-id (JAX_PROCESS_ID) must be in [0, {n}), got {i}"
                         if n is not None else
                         f"--process-id (JAX_PROCESS_ID) must be >= 0, got {i}")
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator-address (JAX_COORDINATOR_ADDRESS) must be "
                             f"host:port, got {coordinator!r}")
    missing = [f for f, v in (("--coordinator-address (JAX_COORDINATOR_ADDRESS)", coordinator),
                              ("--num-processes (JAX_NUM_PROCESSES)", n),
                              ("--process-id (JAX_PROCESS_ID)", i)) if v is None]
    if missing and _cluster_tasks() <= 1:
        raise ValueError(f"a multi-process launch needs {', '.join(missing)} as well")
    return {"coordinator_address": coordinator, "num_processes": n, "process_id": i}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts ``jax.distributed`` when the run is launched as several processes (see the
    module docstring); returns whether it did (or had already). Call it before any JAX
    computation; calling it again is a no-op.

    Raises:
        ValueError: bad or incomplete launch settings, or JAX already computed (one line).
    """
    settings = launch_settings(coordinator, num_processes, process_id)
    import jax
    if jax.distributed.is_initialized():
        return True
    if settings is None:
        return False
    try:
        if jax.config.read("jax_cpu_collectives_implementation") in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # a JAX without the option
        pass
    try:
        jax.distributed.initialize(**{k: v for k, v in settings.items() if v is not None})
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot start jax.distributed ({first}); call "
                         "sparsejax.parallel.distributed.initialize before any JAX computation"
                         ) from None
    return True


def _jax():
    return sys.modules.get("jax")


def is_multiprocess() -> bool:
    """Whether this run has more than one process (``jax.distributed`` started)."""
    jax = _jax()
    return bool(jax is not None and jax.distributed.is_initialized()
                and jax.process_count() > 1)


def process_index() -> int:
    """This process's index (0 for a single process)."""
    return _jax().process_index() if is_multiprocess() else 0


def process_count() -> int:
    return _jax().process_count() if is_multiprocess() else 1


def is_main() -> bool:
    """Whether this process writes the run's shared outputs (process 0)."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op for one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def host_array(x):
    """``x`` as one host numpy array, wherever its shards lie. A jax array spread over
    devices of other processes is gathered (``process_allgather``; then every process
    must call this, in the same order, and each gets the whole array); anything else is
    fetched (``jax.device_get``)."""
    import numpy as np
    jax = _jax()
    if jax is not None and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x) if jax is not None else x)


def to_host(tree):
    """:func:`host_array` of every leaf of ``tree`` (one tensor at a time)."""
    import jax
    return jax.tree.map(host_array, tree)


def broadcast_flag(value: bool) -> bool:
    """Process 0's ``value`` on every process (so all processes take the same branch)."""
    if not is_multiprocess():
        return bool(value)
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(value), np.int32)))
