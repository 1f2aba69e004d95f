"""The trainers' optimizer: sparse fused AdamW on a mask, or dense AdamW.

A trainer accumulates gradients over micro-batches and then steps once. With a mask
the accumulator holds only the gradient values at the ``k`` active entries (each
micro-batch's dense gradient is gathered and dropped), clipping uses the norm of
those entries (that of ``mask * g``), and the fused step writes the ``k`` entries in
place. ``sparsity=0`` (no mask) is full finetuning with ``optax.adamw``, stepping
float32 master weights with float32 moments when the params are bf16
(:func:`sparsejax.dense_adamw.dense_adamw`).

The same object gives the pieces a sparse trainer needs besides the step:
``active_values`` (the ``k`` trained values: a checkpoint of a sparse run stores these,
not the whole model) and ``swap_active`` (in-place exchange of the active values, so
the reference model of a KL term is the current params with the base values swapped
back in: no second copy of the model).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import masks as masks_lib
from sparsejax import sparse_grads as sparse_grads_lib
from sparsejax.dense_adamw import dense_adamw
from sparsejax.optim import (SparseAdamWState, fused_sparse_adamw, gather, gather_bits,
                             global_norm, scatter_bits)
from sparsejax.trainers.config import SparseConfig

PyTree = Any


class StepReport(NamedTuple):
    grad_norm: jax.Array
    skipped: jax.Array


def learning_rate_schedule(cfg: SparseConfig) -> optax.Schedule:
    """Constant ``learning_rate`` after a linear warm-up of ``warmup_steps``."""
    if cfg.warmup_steps <= 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
         optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])


def build_mask(cfg: SparseConfig, params: PyTree) -> PyTree:
    """The run's mask: loaded from ``cfg.mask_path`` or drawn at random."""
    if cfg.mask_path is not None:
        mask, _ = masks_lib.load_mask(cfg.mask_path, like=params)
        return mask
    return masks_lib.random_mask(params, cfg.sparsity, seed=cfg.mask_seed,
                                 strategy=cfg.mask_strategy)


class Updater:
    """Optimizer state handling for one run (see the module docstring)."""

    def __init__(self, cfg: SparseConfig, params: PyTree, mask: PyTree | None = None):
        self.cfg = cfg
        self.schedule = learning_rate_schedule(cfg)
        self.sparse = not cfg.dense
        if self.sparse:
            self.mask = build_mask(cfg, params) if mask is None else mask
            master = cfg.master_weights
            if master is None:
                master = any(x.dtype != jnp.float32 for x in jax.tree.leaves(params))
            self._opt = fused_sparse_adamw(
                self.mask, self.schedule, b1=cfg.b1, b2=cfg.b2,
                weight_decay=cfg.weight_decay, master_weights=master,
                skip_nonfinite=True, max_grad_norm=cfg.max_grad_norm, backend=cfg.backend)
            self.sparse_grads = sparse_grads_lib.use_sparse_grads(
                cfg.sparse_grads, masks_lib.num_active(self.mask)
                / max(1, sum(x.size for x in jax.tree.leaves(params))), cfg.backend)
        else:
            self.mask = None
            self.sparse_grads = False
            # float32 master weights and moments for bf16 params (None: automatic),
            # else updates below bf16's resolution are lost.
            self._opt = dense_adamw(
                self.schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                master_weights=cfg.master_weights, skip_nonfinite=True,
                max_grad_norm=cfg.max_grad_norm)

    # ------------------------------------------------------------------ state

    def policy_params(self, params: PyTree) -> PyTree:
        """The params the decoder sees (here the params themselves; a LoRA variant,
        :class:`sparsejax.lora.LoraUpdater`, attaches its adapters)."""
        return params

    def save_model(self, folder: str, graphdef: Any, params: PyTree,
                   tokenizer: Any = None) -> str:
        """The policy in Hugging Face format (safetensors + config + tokenizer)."""
        from flax import nnx  # pylint: disable=g-import-not-at-top
        from sparsejax.models.hf_io import save_hf  # pylint: disable=g-import-not-at-top
        return save_hf(nnx.merge(graphdef, params), folder, tokenizer=tokenizer)

    def init(self, params: PyTree) -> PyTree:
        return self._opt.init(params)

    def num_trainable(self, params: PyTree) -> int:
        if self.sparse:
            return masks_lib.num_active(self.mask)
        return int(sum(x.size for x in jax.tree.leaves(params)))

    # ------------------------------------------------------------------ gradients

    def compress(self, grads: PyTree, opt_state: PyTree) -> PyTree:
        """What the accumulator keeps of a dense gradient (traceable): float32 values at
        the active entries (sparse) or the float32 gradient (dense)."""
        f32 = lambda g: g.astype(jnp.float32)  # accumulate in float32 even for bf16 params
        if not self.sparse:
            return jax.tree.map(f32, grads)
        return jax.tree.map(lambda g, i: f32(gather(g, i)), grads, opt_state.indices)

    def value_and_grad(self, loss_fn, params: PyTree, opt_state: PyTree):
        """``((loss, aux), grads)`` of ``loss_fn(params) -> (loss, aux)`` (traceable), with
        ``grads`` what the accumulator keeps (:meth:`compress`'s shapes and dtypes).

        Sparse runs with ``sparse_grads`` compute the gradient only at the active
        entries (:mod:`sparsejax.sparse_grads`: no dense weight gradient); otherwise the
        dense gradient is taken and compressed.
        """
        if self.sparse_grads:
            return sparse_grads_lib.value_and_grad(loss_fn, params, opt_state.indices,
                                                   has_aux=True, backend=self.cfg.backend)
        out, grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return out, self.compress(grads, opt_state)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 3))
    def apply(self, params: PyTree, grads: PyTree, opt_state: PyTree
              ) -> tuple[PyTree, PyTree, StepReport]:
        """Clips the (compressed) gradient and steps; params and state are donated.

        A step whose gradient is not finite is skipped: params and state come back bit
        for bit (``StepReport.skipped``)."""
        norm = None if self.cfg.max_grad_norm is not None else global_norm(grads)
        params, opt_state, info = self._opt.update(params, grads, opt_state)
        return params, opt_state, StepReport(
            info.grad_norm if norm is None else norm, info.skipped)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_tree(self, params: PyTree, opt_state: PyTree) -> dict[str, PyTree]:
        """What a checkpoint keeps of the policy: the optimizer state (with the mask) and
        the ``k`` trained values (sparse), or the whole params (dense)."""
        if self.sparse:
            return {"opt_state": opt_state,
                    "active_values": self.active_values(params, opt_state)}
        return {"opt_state": opt_state, "params": params}

    def restore_policy(self, params: PyTree, tree: dict[str, PyTree]
                       ) -> tuple[PyTree, PyTree]:
        """``(params, opt_state)`` from a restored :meth:`checkpoint_tree`.

        For a sparse run ``params`` must be the base params the run started from (the
        trained values are written into them in place).
        """
        opt_state = tree["opt_state"]
        if not self.sparse:
            return tree["params"], opt_state
        params, _ = self.swap_active(params, opt_state.indices, tree["active_values"])
        return params, opt_state

    # ------------------------------------------------------------------ sparse extras

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


def tree_bytes(tree: PyTree) -> int:
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
