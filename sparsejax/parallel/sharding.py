"""How a run is laid out on devices: the mesh, the rule table, and the per-shard step.

A run's devices form a :class:`jax.sharding.Mesh` with two axes, always both present
(size 1 when unused), so no rule branches on which axes exist:

* ``data``: data parallelism; params are replicated over it, batches split over it;
* ``fsdp``: fully sharded data parallelism; large params are split over it, and
  batches are split over it too (the batch axis is ``("data", "fsdp")``).

:func:`parse_mesh` reads a spec such as ``"data=2,fsdp=4"``, ``"auto"`` (every device
on ``fsdp``) or ``""`` (one device). Everything else is placed by rules, from shapes
alone (so the same tensor shards the same way wherever it appears):

=================================  ===============================================
tensor                             placement
=================================  ===============================================
a param of rank >= 2 with at       split over ``fsdp`` along axis 0 if ``fsdp``
least ``min_bytes`` bytes          divides it (a kernel's rows), else along its
                                   largest axis that ``fsdp`` divides
rank 0/1 (norms, biases), smaller  replicated
than ``min_bytes``, or nothing
divides
a mask leaf / optimizer moment /   row-balanced ``(rows, c)`` leaves split on rows
master value                       with their weight when the weight is split
                                   along axis 0; flat ``(k,)`` leaves replicated
dense optimizer state (moments,    like the params
master copy)
counts, scalars                    replicated
a batch (micro-batch, rollout      leading axis over ``("data", "fsdp")``
slots, prompts)
=================================  ===============================================

Why axis 0: a row-balanced mask holds the same number of entries in every row
(:mod:`sparsejax.masks`), so with the weight split into row blocks each device holds
exactly the mask rows, moments and master values of its own block, and the fused
optimizer step touches only local memory: no all-gather of a parameter. A flat mask
cannot follow its weight; its step must communicate, and :func:`warn_if_step_communicates`
says so.

XLA partitions the ``xla`` backend's gather/scatter step itself. A Pallas kernel is
opaque to the partitioner, so on a mesh :func:`per_shard_update` runs the fused step
inside :func:`jax.shard_map`, one block per device, with shard-local indices.

Gradient accumulation and loss normalization are global ``jnp`` operations under
``jit`` on sharded arrays: XLA inserts the reductions, and the numbers are those of
one device up to float32 summation order.
"""

from __future__ import annotations

import collections
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparsejax.types import PyTree

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
MIN_SHARD_BYTES = 1 << 16
"""Params smaller than this (64 KiB) are replicated: splitting them saves little and
costs a collective per use."""


# ---------------------------------------------------------------------- the mesh


def parse_mesh(spec: str | None, device_count: int | None = None) -> dict[str, int]:
    """``{"data": d, "fsdp": f}`` for a mesh spec; ``d * f`` equals the device count.

    ``""`` / None: one device (``{"data": 1, "fsdp": 1}``); ``"auto"``: every device on
    ``fsdp``; ``"data=2,fsdp=4"`` (either axis may be left out: size 1).

    Raises:
        ValueError (one line, naming the mesh): an unknown axis, a bad size, or a mesh
        whose size is not ``device_count`` (default ``jax.device_count()``).
    """
    spec = (spec or "").strip()
    count = jax.device_count() if device_count is None else int(device_count)
    if not spec:
        return {"data": 1, "fsdp": 1}
    if spec == "auto":
        return {"data": 1, "fsdp": count}
    sizes = {"data": 1, "fsdp": 1}
    seen = set()
    for part in spec.split(","):
        name, eq, value = part.partition("=")
        name = name.strip()
        if name not in AXES:
            raise ValueError(f"mesh {spec!r}: unknown axis {name!r}; axes are "
                             f"{', '.join(AXES)} (e.g. data=2,fsdp=4 or auto)")
        if not eq or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh {spec!r}: axis {name} needs a size >= 1 "
                             f"(e.g. {name}=2), got {part.strip()!r}")
        if name in seen:
            raise ValueError(f"mesh {spec!r}: axis {name} given twice")
        seen.add(name)
        sizes[name] = int(value)
    if sizes["data"] * sizes["fsdp"] != count:
        raise ValueError(f"mesh {spec!r} has {sizes['data'] * sizes['fsdp']} devices "
                         f"(data={sizes['data']} x fsdp={sizes['fsdp']}), but "
                         f"jax.device_count() is {count}")
    return sizes


def make_mesh(spec: str | None = "", devices: Any = None) -> Mesh:
    """The run's mesh with axes ``("data", "fsdp")`` (see :func:`parse_mesh`)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices) if (spec or "").strip() else None)
    n = sizes["data"] * sizes["fsdp"]
    grid = np.asarray(devices[:n], dtype=object).reshape(sizes["data"], sizes["fsdp"])
    return Mesh(grid, AXES)


def as_mesh(mesh: str | Mesh | None) -> Mesh | None:
    """``None`` for no mesh (``None`` or ``""``), else a :class:`Mesh` (built from a spec)."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    return make_mesh(mesh) if str(mesh).strip() else None


def mesh_name(mesh: Mesh | None) -> str:
    return "" if mesh is None else ",".join(f"{a}={mesh.shape[a]}" for a in AXES)


def fsdp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape["fsdp"])


def batch_size_of(mesh: Mesh | None) -> int:
    """Devices a batch is split over (``data x fsdp``)."""
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


def per_shard_product(product: Callable, mesh: Mesh) -> Callable:
    """A sampled product (``f(x [N, in], dy [N, out], a, b) -> (k,)``, a sum over the
    ``N`` tokens) run where the tokens live: in :func:`jax.shard_map`, each device sums
    over its own block of tokens (split over ``("data", "fsdp")``, as a batch is) for all
    ``k`` entries, and the blocks' sums are added up across devices (``psum``). An opaque
    kernel (the CPU or Pallas one) runs per device this way; XLA's partitioner would
    instead gather its operands whole. A token count that the batch axis does not divide
    runs ``product`` on the whole (gathered) operands."""
    n = batch_size_of(mesh)

    def local(x, dy, a, b):
        return jax.lax.psum(product(x, dy, a, b), BATCH_AXES)

    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(BATCH_AXES), P(BATCH_AXES), P(), P()),
                           out_specs=P(), check_vma=False)

    def run(x, dy, a, b):
        return mapped(x, dy, a, b) if x.shape[0] % n == 0 else product(x, dy, a, b)

    return run


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------- params


def leaf_spec(shape: tuple[int, ...], itemsize: int, fsdp: int,
              min_bytes: int = MIN_SHARD_BYTES) -> P:
    """The rule table's spec for a param of ``shape`` (see the module docstring)."""
    shape = tuple(int(d) for d in shape)
    if fsdp <= 1 or len(shape) < 2 or math.prod(shape) * itemsize < min_bytes:
        return P()
    if shape[0] % fsdp == 0:
        axis = 0
    else:
        fits = [a for a, d in enumerate(shape) if d % fsdp == 0]
        if not fits:
            return P()
        axis = max(fits, key=lambda a: shape[a])
    return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])


def param_shardings(params: PyTree, mesh: Mesh, *, min_bytes: int | None = None) -> PyTree:
    """A :class:`NamedSharding` per param leaf by the rule table (arrays or anything
    with ``shape`` and ``dtype``, e.g. ``jax.ShapeDtypeStruct``). The tree is what
    :func:`sparsejax.models.hf_io.load_hf_params` takes as ``sharding=``."""
    limit = MIN_SHARD_BYTES if min_bytes is None else min_bytes
    f = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(
        np.shape(x), np.dtype(x.dtype).itemsize, f, limit)), params)


def rows_local(sharding: NamedSharding) -> bool:
    """Whether a param is split along axis 0 only (its row blocks are device-local)."""
    spec = tuple(sharding.spec)
    return bool(spec) and spec[0] == "fsdp" and all(s is None for s in spec[1:])


def mask_shardings(mask: PyTree, param_sh: PyTree, mesh: Mesh) -> PyTree:
    """Shardings of mask-shaped leaves (indices, moments, master values, compressed
    gradients): row-balanced ``(rows, c)`` leaves on rows with a row-split weight,
    everything else replicated."""

    def one(idx, psh):
        if np.ndim(idx) == 2 and np.size(idx) and rows_local(psh):
            return NamedSharding(mesh, P("fsdp", None))
        return replicated(mesh)

    return jax.tree.map(one, mask, param_sh)


def like(tree: PyTree, reference: PyTree, reference_sh: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for ``tree`` (e.g. an optimizer state): every subtree with
    ``reference``'s structure gets ``reference_sh``; every other leaf is replicated."""
    ref_def = jax.tree.structure(reference)
    same = lambda x: x is not None and jax.tree.structure(x) == ref_def
    return jax.tree.map(lambda x: reference_sh if same(x) else replicated(mesh), tree,
                        is_leaf=same)


def put(tree: PyTree, shardings: PyTree) -> PyTree:
    """``tree`` placed on ``shardings`` (a copy only where a leaf moves)."""
    return jax.device_put(tree, shardings)


def constrain(tree: PyTree, shardings: PyTree | None) -> PyTree:
    """``with_sharding_constraint`` when ``shardings`` is given (traceable), else ``tree``."""
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def step_communicates(mask: PyTree, param_sh: PyTree) -> list[str]:
    """Paths of the tensors whose optimizer step cannot stay on their devices: a split
    weight whose mask leaf is flat, or is row-balanced but the weight is not split on rows."""
    from sparsejax.masks.core import path_str
    out = []
    for (path, idx), psh in zip(jax.tree_util.tree_flatten_with_path(mask)[0],
                                jax.tree.leaves(param_sh)):
        split = any(s is not None for s in tuple(psh.spec))
        if split and np.size(idx) and not (np.ndim(idx) == 2 and rows_local(psh)):
            out.append(path_str(path))
    return out


def warn_if_step_communicates(mask: PyTree, param_sh: PyTree) -> list[str]:
    """A one-line stderr warning when some split weight's step must communicate;
    returns those tensors' paths."""
    bad = step_communicates(mask, param_sh)
    if bad:
        print(f"warning: {len(bad)} sharded tensors have a mask that does not follow "
              f"their rows (e.g. {bad[0]}): their optimizer step communicates across "
              "fsdp; use --mask-strategy row_balanced", file=sys.stderr, flush=True)
    return bad


# ---------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A batch's leading axis split over ``("data", "fsdp")``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(name: str, size: int, mesh: Mesh | None) -> None:
    """Raises a one-line ValueError naming ``name`` unless the batch axis divides it."""
    n = batch_size_of(mesh)
    if size % n:
        raise ValueError(f"{name} ({size}) must be a multiple of the batch axis "
                         f"data x fsdp = {n} of mesh {mesh_name(mesh)!r}")


def put_batch(batch: PyTree, mesh: Mesh | None) -> PyTree:
    """A batch (leading axis the examples) split over the batch axis; as is without a mesh."""
    if mesh is None:
        return batch
    return jax.device_put(batch, batch_sharding(mesh))


# ---------------------------------------------------------------------- memory


def bytes_per_device(tree: PyTree) -> int:
    """The most bytes any one device holds of ``tree``'s leaves (jax arrays, or
    ``jax.ShapeDtypeStruct`` with a ``sharding``). A leaf without a sharding (e.g. a
    NumPy array) counts in full on every device (an upper bound)."""
    per: collections.Counter = collections.Counter()
    unplaced = 0
    for x in jax.tree.leaves(tree):
        item = np.dtype(x.dtype).itemsize
        sh = getattr(x, "sharding", None)
        shape = tuple(np.shape(x))
        if sh is None:
            unplaced += math.prod(shape) * item
            continue
        for dev, index in sh.devices_indices_map(shape).items():
            n = math.prod(len(range(*s.indices(d))) for s, d in zip(index, shape))
            per[dev] += n * item
    return int(max(per.values(), default=0) + unplaced)


def memory_per_device(params: Any, opt_state: Any, grads: Any) -> dict[str, int]:
    """The first metrics record's memory fields: :func:`bytes_per_device` of the params,
    the optimizer state and the gradient accumulator (arrays or abstract values)."""
    return {"params_bytes_per_device": bytes_per_device(params),
            "optimizer_state_bytes_per_device": bytes_per_device(opt_state),
            "grad_accumulator_bytes_per_device": bytes_per_device(grads)}


def abstract(tree: PyTree, shardings: PyTree | None) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves of ``tree`` carrying ``shardings`` (None: none)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)
