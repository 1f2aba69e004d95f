"""Indexed AdamW as a Pallas kernel (Triton backend): touches only the ``k`` active entries.

The kernel implements the contract of
:func:`sparsejax.backends.xla_indexed_adamw_step`: for each tensor it gathers the
active entries of the parameter (or reads their float32 master values) and of the
dense gradient (or reads an already compressed gradient), runs
:func:`sparsejax.optim.adamw_math.adamw_math` on them in float32, and scatters the new
values into the parameter in place (the parameter is an input/output alias).

Layout of one launch (see ``kernels/README.md`` for the cost model):

* a 1-D grid over blocks of ``block`` consecutive active entries; ``block`` is a
  power of two (Triton requires it) and the last block of a tensor is ragged, so
  every load and store is masked with ``lane < k``;
* the parameter, the dense gradient and every compressed array are passed whole
  (no ``BlockSpec`` tiling): the kernel only dereferences the addresses it
  computes, so nothing of size ``N`` is streamed;
* masked lanes of the index vector hold :data:`PAD_INDEX`, an index past the end
  of any parameter: on a GPU masked lanes are not dereferenced, while the CPU
  interpreter still performs the scatter for them (writing the old value back at
  their index), where an out-of-range index is dropped and an index such as 0
  would race with the real update of entry 0;
* the :class:`~sparsejax.optim.adamw_math.AdamWScalars` travel as a small float32 array
  input, so a new learning rate or step count never recompiles;
* several tensors can share one launch (:func:`indexed_adamw_multi_step`): each
  tensor owns a static range of program ids and the kernel body branches on it.

Backends: ``interpret=False`` lowers through Pallas' Triton backend (selected by
passing :class:`jax.experimental.pallas.triton.CompilerParams`; without it JAX
0.9-0.11 picks Mosaic GPU); ``interpret=True`` runs the same kernel body on CPU.
The public functions are the seam: a Mosaic GPU version can replace the kernel
without touching callers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sparsejax.optim.adamw_math import AdamWScalars, adamw_math

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "DEFAULT_MAX_TENSORS_PER_LAUNCH",
    "PAD_INDEX",
    "block_size_for",
    "indexed_adamw_step",
    "indexed_adamw_multi_step",
]

DEFAULT_BLOCK_SIZE = 1024
"""Active entries per program (4 warps: 8 entries per thread)."""

MIN_BLOCK_SIZE = 16
"""Smallest block used for tiny tensors (a power of two, like every block)."""

DEFAULT_MAX_TENSORS_PER_LAUNCH = 32
"""Tensors per launch in :func:`indexed_adamw_multi_step`.

Each tensor adds 8-10 pointer arguments to the kernel (its inputs and its aliased
outputs, at most 80 bytes: 32 tensors stay under CUDA's classic 4 KiB of kernel
parameters) and one static branch to its body (Triton compile time grows with the
branch count).
"""

PAD_INDEX = int(np.iinfo(np.int32).max)
"""Index given to masked lanes: past the end of any parameter addressable by int32."""

_NUM_WARPS = 4
_NUM_STAGES = 1  # no loop to pipeline


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def block_size_for(k: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """The block used for a tensor with ``k`` active entries.

    The smallest power of two ``>= k``, clamped to ``[MIN_BLOCK_SIZE, block_size]``
    (so tiny tensors do not launch mostly-masked 1024-wide programs).
    """
    if not _is_power_of_two(block_size):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return min(block_size, max(MIN_BLOCK_SIZE, pl.next_power_of_2(max(k, 1))))


@dataclasses.dataclass(frozen=True)
class _TensorPlan:
    """Static description of one tensor inside a launch (hashable: a jit static arg)."""

    k: int  # active entries
    block: int  # entries per program, a power of two
    first_program: int  # first program id of this tensor in the launch grid
    num_programs: int  # cdiv(k, block)
    grad_is_compressed: bool
    has_master: bool
    scalar_row: int  # row of the scalars array holding this tensor's AdamWScalars

    @property
    def num_inputs(self) -> int:
        """indices, param, grad, mu, nu (+ master)."""
        return 6 if self.has_master else 5

    @property
    def num_outputs(self) -> int:
        """param, mu, nu (+ master)."""
        return 4 if self.has_master else 3


def _load(ref: Any, *, mask: jax.Array, other: Any) -> jax.Array:
    """Masked load through the Triton-backend API (present in JAX 0.10 to 0.12)."""
    return pltriton.load(ref, mask=mask, other=other)


def _store(ref: Any, value: jax.Array, *, mask: jax.Array) -> None:
    """Masked store through the Triton-backend API."""
    pltriton.store(ref, value, mask=mask)


def _step_block(plan: _TensorPlan, local_program: jax.Array, scalars_ref: Any,
                in_refs: Sequence[Any], out_refs: Sequence[Any]) -> None:
    """Updates the active entries ``[local_program * block, ... + block)`` of one tensor."""
    if plan.has_master:
        indices_ref, param_ref, grad_ref, mu_ref, nu_ref, master_ref = in_refs
        param_out, mu_out, nu_out, master_out = out_refs
    else:
        indices_ref, param_ref, grad_ref, mu_ref, nu_ref = in_refs
        param_out, mu_out, nu_out = out_refs
        master_ref = master_out = None
    block = plan.block
    start = local_program * block
    lanes = start + jnp.arange(block, dtype=jnp.int32)
    valid = lanes < plan.k
    window = pl.ds(start, block)

    idx = _load(indices_ref.at[window], mask=valid, other=PAD_INDEX)
    g_src = grad_ref.at[window] if plan.grad_is_compressed else grad_ref.at[idx]
    g = _load(g_src, mask=valid, other=0).astype(jnp.float32)
    if master_ref is not None:
        p = _load(master_ref.at[window], mask=valid, other=0)
    else:
        p = _load(param_ref.at[idx], mask=valid, other=0).astype(jnp.float32)
    mu = _load(mu_ref.at[window], mask=valid, other=0).astype(jnp.float32)
    nu = _load(nu_ref.at[window], mask=valid, other=0)

    row = plan.scalar_row
    scalars = AdamWScalars(*(scalars_ref[row, j] for j in range(len(AdamWScalars._fields))))
    new_p, new_mu, new_nu = adamw_math(p, g, mu, nu, scalars)

    _store(param_out.at[idx], new_p.astype(param_out.dtype), mask=valid)
    _store(mu_out.at[window], new_mu.astype(mu_out.dtype), mask=valid)
    _store(nu_out.at[window], new_nu.astype(nu_out.dtype), mask=valid)
    if master_out is not None:
        _store(master_out.at[window], new_p, mask=valid)


def _kernel(*refs: Any, plans: tuple[_TensorPlan, ...]) -> None:
    """Kernel body: program ``pid`` updates one block of the tensor that owns ``pid``."""
    num_in = sum(p.num_inputs for p in plans)
    scalars_ref, in_refs, out_refs = refs[0], refs[1:1 + num_in], refs[1 + num_in:]
    pid = pl.program_id(0)
    i_off = o_off = 0
    for plan in plans:
        t_in = in_refs[i_off:i_off + plan.num_inputs]
        t_out = out_refs[o_off:o_off + plan.num_outputs]
        i_off += plan.num_inputs
        o_off += plan.num_outputs
        body = functools.partial(_step_block, plan, pid - plan.first_program,
                                 scalars_ref, t_in, t_out)
        if len(plans) == 1:
            body()
        else:
            lo, hi = plan.first_program, plan.first_program + plan.num_programs
            pl.when((pid >= lo) & (pid < hi))(body)


def _build_call(plans: tuple[_TensorPlan, ...], flat_args: Sequence[Any], *,
                interpret: bool):
    """The ``pallas_call`` for ``plans``; ``flat_args`` gives shapes (arrays or structs).

    ``flat_args`` is ``[scalars, *per-tensor (indices, param, grad, mu, nu[, master])]``
    with the parameter and gradient already flattened to 1-D. No validation happens
    here (the lowering tests use it to build deliberately invalid kernels).
    """
    out_shape = []
    aliases = {}
    pos = 1
    for plan in plans:
        t_args = flat_args[pos:pos + plan.num_inputs]
        outs = [t_args[1], t_args[3], t_args[4]] + ([t_args[5]] if plan.has_master else [])
        in_positions = [pos + 1, pos + 3, pos + 4] + ([pos + 5] if plan.has_master else [])
        for arg, in_pos in zip(outs, in_positions):
            aliases[in_pos] = len(out_shape)
            out_shape.append(jax.ShapeDtypeStruct(arg.shape, arg.dtype))
        pos += plan.num_inputs
    grid = (sum(p.num_programs for p in plans),)
    return pl.pallas_call(
        functools.partial(_kernel, plans=plans),
        out_shape=out_shape,
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=_NUM_STAGES),
        interpret=interpret,
        name="indexed_adamw",
    )


@functools.partial(jax.jit, static_argnames=("plans", "interpret"))
def _launch(scalars: jax.Array, flat_args: list[jax.Array], *,
            plans: tuple[_TensorPlan, ...], interpret: bool) -> list[jax.Array]:
    return _build_call(plans, [scalars, *flat_args], interpret=interpret)(scalars, *flat_args)


def _scalars_array(scalars: Sequence[AdamWScalars]) -> jax.Array:
    """``(len(scalars), 8)`` float32 rows in :class:`AdamWScalars` field order."""
    return jnp.stack([
        jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in s]) for s in scalars])


def _check_tensor(i: int, param: jax.Array, grad: jax.Array, indices: jax.Array,
                  mu: jax.Array, nu: jax.Array, master: jax.Array | None,
                  grad_is_compressed: bool) -> int:
    """Shape/dtype checks of one tensor's arguments; returns ``k``."""
    if indices.ndim != 1:
        raise ValueError(f"tensor {i}: indices must be 1-D, got shape {indices.shape}")
    k = indices.shape[0]
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"tensor {i}: indices must be integers, got {indices.dtype}")
    if not jnp.issubdtype(param.dtype, jnp.floating):
        raise TypeError(f"tensor {i}: param must be floating, got {param.dtype}")
    if param.size > PAD_INDEX:
        raise ValueError(f"tensor {i}: {param.size} entries exceed int32 indexing")
    want_grad = (k,) if grad_is_compressed else param.shape
    if tuple(grad.reshape(-1).shape if grad_is_compressed else grad.shape) != tuple(want_grad):
        raise ValueError(f"tensor {i}: grad shape {grad.shape}, expected {want_grad}")
    for name, arr in (("mu", mu), ("nu", nu), ("master", master)):
        if arr is not None and arr.shape != (k,):
            raise ValueError(f"tensor {i}: {name} shape {arr.shape}, expected {(k,)}")
    if master is not None and master.dtype != jnp.float32:
        raise TypeError(f"tensor {i}: master must be float32, got {master.dtype}")
    return k


def indexed_adamw_multi_step(
        params: Sequence[jax.Array],
        grads: Sequence[jax.Array],
        indices: Sequence[jax.Array],
        mus: Sequence[jax.Array],
        nus: Sequence[jax.Array],
        masters: Sequence[jax.Array | None] | None,
        scalars: AdamWScalars | Sequence[AdamWScalars],
        *,
        grad_is_compressed: bool | Sequence[bool] = False,
        interpret: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_tensors_per_launch: int = DEFAULT_MAX_TENSORS_PER_LAUNCH,
) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array], list[jax.Array | None]]:
    """Indexed AdamW steps of several tensors, ``max_tensors_per_launch`` per kernel launch.

    Each tensor follows :func:`sparsejax.backends.xla_indexed_adamw_step`'s contract;
    all lists have one entry per tensor. ``masters`` may be None (no master copies)
    or hold None for tensors without one. ``scalars`` is one :class:`AdamWScalars`
    shared by all tensors or one per tensor (e.g. a per-tensor weight decay);
    ``grad_is_compressed`` likewise. Tensors with ``k = 0`` are returned unchanged
    and launch nothing. The parameters are updated in place when the caller's jit
    donates them; otherwise XLA copies them first (the aliasing then costs an
    ``N``-sized copy).

    Returns:
        ``(params, mus, nus, masters)`` as lists in input order.
    """
    num = len(params)
    if not (len(grads) == len(indices) == len(mus) == len(nus) == num):
        raise ValueError("params, grads, indices, mus and nus must have equal lengths")
    masters = [None] * num if masters is None else list(masters)
    if len(masters) != num:
        raise ValueError("masters must be None or have one entry per tensor")
    if isinstance(scalars, AdamWScalars):
        scalar_list, shared = [scalars], True
    else:
        scalar_list, shared = list(scalars), False
        if len(scalar_list) != num:
            raise ValueError("scalars must be one AdamWScalars or one per tensor")
    compressed = ([bool(grad_is_compressed)] * num if isinstance(grad_is_compressed, bool)
                  else [bool(c) for c in grad_is_compressed])
    if len(compressed) != num:
        raise ValueError("grad_is_compressed must be a bool or one per tensor")
    if max_tensors_per_launch < 1:
        raise ValueError("max_tensors_per_launch must be >= 1")

    new_params, new_mus, new_nus, new_masters = (list(params), list(mus), list(nus),
                                                 list(masters))
    active = []
    for i in range(num):
        k = _check_tensor(i, params[i], grads[i], indices[i], mus[i], nus[i], masters[i],
                          compressed[i])
        if k > 0:
            active.append((i, k))

    scalars_arr = _scalars_array(scalar_list) if active else None
    for chunk_start in range(0, len(active), max_tensors_per_launch):
        chunk = active[chunk_start:chunk_start + max_tensors_per_launch]
        plans, flat_args, first = [], [], 0
        for i, k in chunk:
            block = block_size_for(k, block_size)
            plan = _TensorPlan(
                k=k, block=block, first_program=first, num_programs=pl.cdiv(k, block),
                grad_is_compressed=compressed[i], has_master=masters[i] is not None,
                scalar_row=0 if shared else i)
            first += plan.num_programs
            plans.append(plan)
            flat_args += [indices[i].astype(jnp.int32), params[i].reshape(-1),
                          grads[i].reshape(-1), mus[i], nus[i]]
            if masters[i] is not None:
                flat_args.append(masters[i])
        outs = _launch(scalars_arr, flat_args, plans=tuple(plans), interpret=interpret)
        pos = 0
        for (i, _), plan in zip(chunk, plans):
            new_params[i] = outs[pos].reshape(params[i].shape)
            new_mus[i], new_nus[i] = outs[pos + 1], outs[pos + 2]
            if plan.has_master:
                new_masters[i] = outs[pos + 3]
            pos += plan.num_outputs
    return new_params, new_mus, new_nus, new_masters


def indexed_adamw_step(
        param: jax.Array,
        grad: jax.Array,
        indices: jax.Array,
        mu: jax.Array,
        nu: jax.Array,
        master: jax.Array | None,
        scalars: AdamWScalars,
        *,
        grad_is_compressed: bool = False,
        interpret: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Indexed AdamW step of one tensor with the Pallas kernel.

    Same arguments, results and numerics as
    :func:`sparsejax.backends.xla_indexed_adamw_step` (float32 math in
    :func:`~sparsejax.optim.adamw_math.adamw_math`'s op order), plus ``interpret`` (run the
    kernel on CPU) and ``block_size`` (the largest block, a power of two). With
    ``k = 0`` the inputs are returned unchanged and nothing is launched.
    """
    p, m, v, w = indexed_adamw_multi_step(
        [param], [grad], [indices], [mu], [nu], [master], scalars,
        grad_is_compressed=grad_is_compressed, interpret=interpret,
        block_size=block_size)
    return p[0], m[0], v[0], w[0]
