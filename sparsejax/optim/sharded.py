"""The fused sparse step on a mesh, per shard: each device steps its own row block.

An opaque kernel (Pallas) cannot be partitioned by XLA, so on a mesh the step's
per-tensor work runs in :func:`jax.shard_map` with shard-local indices
(:func:`per_shard_update`); clipping and the non-finite guard stay global.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sparsejax.optim.sparse import StepInfo, all_finite, clip_compressed
from sparsejax.parallel.sharding import mask_shardings, rows_local
from sparsejax.types import PyTree


def _local_indices(idx: jax.Array, param: jax.Array, split: bool) -> jax.Array:
    """Inside ``shard_map``: a row block's global flat indices made local to its block."""
    if not split or idx.size == 0:
        return idx
    offset = jax.lax.axis_index("fsdp").astype(jnp.int32) * jnp.int32(param.size)
    return idx - offset


def per_shard_update(local_update: Callable, mesh: Mesh, param_sh: PyTree, mask: PyTree,
                     max_grad_norm: float | None) -> Callable:
    """The fused sparse step (``skip_nonfinite=True`` and clipping at ``max_grad_norm``,
    as :func:`sparsejax.optim.fused_sparse_adamw` does them) with the per-tensor work in
    :func:`jax.shard_map`: each device steps its own row block with shard-local indices,
    so an opaque kernel (Pallas) runs where its data lives.

    ``local_update(params, grads, state)`` is the ``update`` of a fused sparse AdamW built
    with ``max_grad_norm=None, skip_nonfinite=False`` (same hyperparameters otherwise).
    Clipping and the finiteness check are global (computed on the sharded compressed
    gradient outside the map). Tensors whose mask cannot follow their rows (see
    :func:`step_communicates`) enter the map whole (gathered) and leave it split again.
    """

    def step_spec(idx, psh):
        if np.size(idx) == 0 or (np.ndim(idx) == 2 and rows_local(psh)):
            return psh.spec
        return P()

    p_spec = jax.tree.map(step_spec, mask, param_sh)
    m_spec = jax.tree.map(lambda s: s.spec, mask_shardings(mask, param_sh, mesh))
    split = jax.tree.map(lambda idx, psh: bool(np.size(idx)) and np.ndim(idx) == 2
                         and rows_local(psh), mask, param_sh)

    def mapped(params, grads, state):
        s_spec = state._replace(
            count=P(), skipped=P(), indices=m_spec, mu=m_spec, nu=m_spec,
            master=None if state.master is None else m_spec)

        def local(p, g, st):
            idx = jax.tree.map(_local_indices, st.indices, p, split)
            new_p, new_st, _ = local_update(p, g, st._replace(indices=idx))
            return new_p, new_st._replace(indices=st.indices)

        return jax.shard_map(local, mesh=mesh, in_specs=(p_spec, m_spec, s_spec),
                             out_specs=(p_spec, s_spec), check_vma=False)(
                                 params, grads, state)

    def update(params, grads, state):
        grads, norm = clip_compressed(grads, max_grad_norm)
        ok = all_finite(grads)
        params, state = jax.lax.cond(
            ok, mapped, lambda p, g, st: (p, st._replace(skipped=st.skipped + 1)),
            params, grads, state)
        return params, state, StepInfo(jnp.logical_not(ok), norm)

    return update
