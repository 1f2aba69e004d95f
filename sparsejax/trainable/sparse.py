"""Sparse entries: the ``k`` entries of a mask train, stepped in place by the fused
sparse AdamW with moments (and master values) of size ``k``.

The gradient accumulator holds only the float32 gradient values at the ``k`` active
entries: with ``sparse_grads`` the backward pass computes only those
(:mod:`sparsejax.sparse_backward`), otherwise each micro-batch's dense gradient is
gathered and dropped. Clipping uses the norm of those entries (that of ``mask * g``).

A checkpoint stores the optimizer state (with the mask) and the ``k`` trained values,
not the whole model (:meth:`SparseEntries.active_values`); the rest comes from the base
weights the run started from. The base policy of a KL term or of DPO is the params with
the base values of the ``k`` entries swapped back in place (:meth:`swap_active`): no
second copy of the model.

On a mesh (:mod:`sparsejax.parallel.sharding`) the params are placed by the rule table,
the state like the mask (row-balanced leaves on their weight's rows), gradients are
constrained to the mask's shardings and, with a Pallas backend, the step runs per shard.
A mask strategy of ``"auto"`` draws ``row_balanced`` masks on a mesh (the step stays on
the devices) and ``per_tensor`` (the papers' draw) without one.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib
from sparsejax import sparse_backward
from sparsejax.backends import resolve_backend
from sparsejax.masks.core import leaves_with_paths
from sparsejax.masks.indexing import gather, gather_bits, scatter_bits
from sparsejax.optim.sparse import SparseAdamWState, fused_sparse_adamw, global_norm
from sparsejax.parallel import sharding as sharding_lib
from sparsejax.trainable.base import StepReport, TrainsMaskedValues, learning_rate_schedule, save_hf_model
from sparsejax.types import PyTree


def mask_strategy(cfg: Any, mesh: Any = None) -> str:
    """``cfg.mask_strategy`` with ``"auto"`` resolved: ``row_balanced`` on a mesh (the
    step stays shard-local under FSDP), ``per_tensor`` (the papers' draw) without."""
    if cfg.mask_strategy != "auto":
        return cfg.mask_strategy
    return "row_balanced" if mesh is not None else "per_tensor"


def build_mask(cfg: Any, params: PyTree, mesh: Any = None) -> PyTree:
    """The run's mask: loaded from ``cfg.mask_path`` or drawn at random."""
    if cfg.mask_path is not None:
        mask, _ = masks_lib.load_mask(cfg.mask_path, like=params)
        if cfg.freeze is not None:
            paths, leaves, _ = leaves_with_paths(mask)
            for path, idx in zip(paths, leaves):
                if np.size(idx) and re.search(cfg.freeze, path):
                    raise ValueError(f"{cfg.mask_path} trains entries of {path}, which "
                                     f"freeze {cfg.freeze!r} matches")
        return mask
    return masks_lib.random_mask(params, cfg.sparsity, seed=cfg.mask_seed,
                                 strategy=mask_strategy(cfg, mesh), exclude=cfg.freeze)


class SparseEntries(TrainsMaskedValues):
    """The entries of a mask train (implements :class:`~sparsejax.trainable.base.Trainable`).

    Args:
      cfg: the mask and optimizer settings (:class:`~sparsejax.config.TrainableConfig`).
      params: the base params (shapes are enough).
      mask: the mask to train (default: built from ``cfg``: loaded or drawn).
      mesh: a :class:`jax.sharding.Mesh` or mesh spec; None / ``""``: no placement.
      total_steps: the run's optimizer steps (a decaying learning rate or a warm-up
        ratio needs them).
    """

    def __init__(self, cfg: Any, params: PyTree, mask: PyTree | None = None, *,
                 mesh: Any = None, total_steps: int | None = None):
        self.cfg = cfg
        self.mesh = sharding_lib.as_mesh(mesh)
        self.schedule = learning_rate_schedule(cfg, total_steps)
        self.mask = build_mask(cfg, params, self.mesh) if mask is None else mask
        master = cfg.master_weights
        if master is None:
            master = any(x.dtype != jnp.float32 for x in jax.tree.leaves(params))
        self._opt = fused_sparse_adamw(
            self.mask, self.schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
            master_weights=master, skip_nonfinite=True, max_grad_norm=cfg.max_grad_norm,
            backend=cfg.backend)
        self.sparse_grads = sparse_backward.use_sparse_grads(
            cfg.sparse_grads, masks_lib.num_active(self.mask)
            / max(1, sum(x.size for x in jax.tree.leaves(params))), cfg.backend)
        self._local_opt = None
        if self.mesh is not None and resolve_backend(cfg.backend) != "xla":
            # The kernel is opaque to the partitioner: step per shard (the sparse
            # backward's sampled product runs per shard too, on each device's tokens).
            self._local_opt = fused_sparse_adamw(
                self.mask, self.schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                master_weights=master, skip_nonfinite=False, max_grad_norm=None,
                backend=cfg.backend)
        self._update = None
        self.shardings: dict[str, PyTree] | None = None  # "params" and "mask"

    def settings(self) -> dict[str, Any]:
        """The config with ``mask_strategy="auto"`` resolved to the strategy the mask was
        drawn with, so a checkpoint of either spelling resumes under the other."""
        return {**dataclasses.asdict(self.cfg), "mask_strategy": mask_strategy(self.cfg, self.mesh)}

    def describe(self) -> str:
        return f"sparsity {self.cfg.sparsity}" if self.cfg.mask_path is None else (
            f"the entries of {self.cfg.mask_path}")

    # ------------------------------------------------------------------ layout

    def _lay_out(self, params: PyTree) -> None:
        mesh = self.mesh
        p_sh = sharding_lib.param_shardings(params, mesh)
        m_sh = sharding_lib.mask_shardings(self.mask, p_sh, mesh)
        if sharding_lib.fsdp_size(mesh) > 1:
            sharding_lib.warn_if_step_communicates(self.mask, p_sh)
        if self._local_opt is not None:
            from sparsejax.optim.sharded import per_shard_update
            self._update = per_shard_update(self._local_opt.update, mesh, p_sh, self.mask,
                                            self.cfg.max_grad_norm)
        self.shardings = {"params": p_sh, "mask": m_sh}

    def _state_shardings(self, opt_state: PyTree) -> PyTree:
        return sharding_lib.like(opt_state, self.mask, self.shardings["mask"], self.mesh)

    def _grad_shardings(self) -> PyTree | None:
        return None if self.shardings is None else self.shardings["mask"]

    # ------------------------------------------------------------------ state

    def policy_params(self, params: PyTree) -> PyTree:
        if self.mesh is None:
            return params
        self._lay_out(params)
        return sharding_lib.put(params, self.shardings["params"])

    def init(self, params: PyTree) -> PyTree:
        if self.mesh is None:
            return self._opt.init(params)
        if self.shardings is None:
            self._lay_out(params)
        state = self._opt.init(params)
        return sharding_lib.put(state, self._state_shardings(state))

    def num_trainable(self, params: PyTree) -> int:
        del params
        return masks_lib.num_active(self.mask)

    def memory_report(self, params: PyTree, opt_state: PyTree) -> dict[str, int]:
        grads = jax.eval_shape(self.compress, params, opt_state)
        if self.shardings is not None:
            grads = sharding_lib.abstract(grads, self._grad_shardings())
        return sharding_lib.memory_per_device(params, opt_state, grads)

    def save_model(self, folder: str, graphdef: Any, params: PyTree, tokenizer: Any = None
                   ) -> str:
        return save_hf_model(folder, graphdef, params, tokenizer)

    # ------------------------------------------------------------------ gradients

    def compress(self, grads: PyTree, opt_state: PyTree) -> PyTree:
        """float32 gradient values at the active entries (traceable)."""
        return sharding_lib.constrain(
            jax.tree.map(lambda g, i: gather(g, i).astype(jnp.float32), grads,
                         opt_state.indices), self._grad_shardings())

    def value_and_grad(self, loss_fn, params: PyTree, opt_state: PyTree):
        """With ``sparse_grads`` only the active entries' gradient is computed (no dense
        weight gradient); otherwise the dense gradient is taken and compressed."""
        if self.sparse_grads:
            out, grads = sparse_backward.value_and_grad(
                loss_fn, params, opt_state.indices, has_aux=True, backend=self.cfg.backend,
                mesh=self.mesh)
            return out, sharding_lib.constrain(grads, self._grad_shardings())
        out, grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return out, self.compress(grads, opt_state)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 3))
    def apply(self, params: PyTree, grads: PyTree, opt_state: PyTree
              ) -> tuple[PyTree, PyTree, StepReport]:
        norm = None if self.cfg.max_grad_norm is not None else global_norm(grads)
        update = self._opt.update if self._update is None else self._update
        params, opt_state, info = update(params, grads, opt_state)
        if self.shardings is not None:  # every output where its input was (donation)
            params = sharding_lib.constrain(params, self.shardings["params"])
            opt_state = sharding_lib.constrain(opt_state, self._state_shardings(opt_state))
        return params, opt_state, StepReport(
            info.grad_norm if norm is None else norm, info.skipped)

    # ------------------------------------------------------------------ checkpoints

    @staticmethod
    @jax.jit
    def active_values(params: PyTree, opt_state: SparseAdamWState) -> PyTree:
        """The values of the active entries (``k`` per tensor)."""
        return jax.tree.map(gather_bits, params, opt_state.indices)

    @staticmethod
    @functools.partial(jax.jit, donate_argnums=0)
    def swap_active(params: PyTree, indices: PyTree, values: PyTree
                    ) -> tuple[PyTree, PyTree]:
        """Writes ``values`` at ``indices`` in place; returns ``(params, previous values)``."""
        old = jax.tree.map(gather_bits, params, indices)
        new = jax.tree.map(scatter_bits, params, indices, values)
        return new, old
