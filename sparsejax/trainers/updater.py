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

On a mesh (``Updater(..., mesh=...)``, see :mod:`sparsejax.sharding`) the same object
lays the run out: :meth:`policy_params` places the params by the rule table,
:meth:`init` places the state like them (row-balanced mask leaves on their weight's
rows), gradients are constrained to the mask's (or params') shardings, the step keeps
every output where its input was, and with a Pallas backend the step runs per shard
(:func:`sparsejax.sharding.per_shard_update`). A mask strategy of ``"auto"`` is
``row_balanced`` on a mesh (its step stays on the devices) and ``per_tensor`` without.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax import masks as masks_lib
from sparsejax import sharding as sharding_lib
from sparsejax import sparse_grads as sparse_grads_lib
from sparsejax.dense_adamw import dense_adamw
from sparsejax.backends import resolve_backend
from sparsejax.optim import (SparseAdamWState, fused_sparse_adamw, gather, gather_bits,
                             global_norm, scatter_bits)
from sparsejax.trainers import reference as reference_lib
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


def mask_strategy(cfg: SparseConfig, mesh: Any = None) -> str:
    """``cfg.mask_strategy`` with ``"auto"`` resolved: ``row_balanced`` on a mesh (the
    step stays shard-local under FSDP), ``per_tensor`` (the papers' draw) without."""
    if cfg.mask_strategy != "auto":
        return cfg.mask_strategy
    return "row_balanced" if mesh is not None else "per_tensor"


def build_mask(cfg: SparseConfig, params: PyTree, mesh: Any = None) -> PyTree:
    """The run's mask: loaded from ``cfg.mask_path`` or drawn at random."""
    if cfg.mask_path is not None:
        mask, _ = masks_lib.load_mask(cfg.mask_path, like=params)
        return mask
    return masks_lib.random_mask(params, cfg.sparsity, seed=cfg.mask_seed,
                                 strategy=mask_strategy(cfg, mesh))


class Updater:
    """Optimizer state handling for one run (see the module docstring).

    Args:
      cfg: the optimizer and mask settings.
      params: the base params (shapes are enough).
      mask: the mask to train (default: built from ``cfg``).
      mesh: a :class:`jax.sharding.Mesh` or mesh spec (:mod:`sparsejax.sharding`);
        None / ``""``: no placement (one device, as before).
    """

    def __init__(self, cfg: SparseConfig, params: PyTree, mask: PyTree | None = None, *,
                 mesh: Any = None):
        self.cfg = cfg
        self.mesh = sharding_lib.as_mesh(mesh)
        self.schedule = learning_rate_schedule(cfg)
        self.sparse = not cfg.dense
        self._update = None
        if self.sparse:
            self.mask = build_mask(cfg, params, self.mesh) if mask is None else mask
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
            self._local_opt = None
            if self.mesh is not None and resolve_backend(cfg.backend) != "xla":
                # The kernel is opaque to the partitioner: step per shard (the sparse
                # backward's sampled product runs per shard too, on each device's tokens).
                self._local_opt = fused_sparse_adamw(
                    self.mask, self.schedule, b1=cfg.b1, b2=cfg.b2,
                    weight_decay=cfg.weight_decay, master_weights=master,
                    skip_nonfinite=False, max_grad_norm=None, backend=cfg.backend)
        else:
            self.mask = None
            self.sparse_grads = False
            # float32 master weights and moments for bf16 params (None: automatic),
            # else updates below bf16's resolution are lost.
            self._opt = dense_adamw(
                self.schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                master_weights=cfg.master_weights, skip_nonfinite=True,
                max_grad_norm=cfg.max_grad_norm)
        self.shardings: dict[str, PyTree] | None = None

    # ------------------------------------------------------------------ layout

    def _lay_out(self, params: PyTree) -> None:
        """The shardings of params, mask-shaped leaves and gradients on the mesh."""
        mesh = self.mesh
        p_sh = sharding_lib.param_shardings(params, mesh)
        out = {"params": p_sh}
        if self.sparse:
            out["mask"] = sharding_lib.mask_shardings(self.mask, p_sh, mesh)
            out["grads"] = out["mask"]
            if sharding_lib.fsdp_size(mesh) > 1:
                sharding_lib.warn_if_step_communicates(self.mask, p_sh)
            if self._local_opt is not None:
                self._update = sharding_lib.per_shard_update(
                    self._local_opt.update, mesh, p_sh, self.mask, self.cfg.max_grad_norm)
        else:
            out["grads"] = p_sh
        self.shardings = out

    def _state_shardings(self, opt_state: PyTree) -> PyTree:
        sh = self.shardings
        if self.sparse:
            return sharding_lib.like(opt_state, self.mask, sh["mask"], self.mesh)
        return sharding_lib.like(opt_state, sh["params"], sh["params"], self.mesh)

    def memory_report(self, params: PyTree, opt_state: PyTree) -> dict[str, int]:
        """Bytes per device of the params, the optimizer state and the gradient
        accumulator (the compressed gradient, placed as the step receives it)."""
        grads = jax.eval_shape(self.compress, params, opt_state)
        if self.shardings is not None:
            grads = sharding_lib.abstract(grads, self.shardings["grads"])
        return sharding_lib.memory_per_device(params, opt_state, grads)

    # ------------------------------------------------------------------ state

    def policy_params(self, params: PyTree) -> PyTree:
        """The params the decoder sees (here the params themselves; a LoRA variant,
        :class:`sparsejax.lora.LoraUpdater`, attaches its adapters), placed on the
        mesh by the rule table when there is one."""
        if self.mesh is None:
            return params
        self._lay_out(params)
        return sharding_lib.put(params, self.shardings["params"])

    def save_model(self, folder: str, graphdef: Any, params: PyTree,
                   tokenizer: Any = None) -> str:
        """The policy in Hugging Face format (safetensors + config + tokenizer)."""
        from flax import nnx  # pylint: disable=g-import-not-at-top
        from sparsejax.models.hf_io import save_hf  # pylint: disable=g-import-not-at-top
        return save_hf(nnx.merge(graphdef, params), folder, tokenizer=tokenizer)

    def init(self, params: PyTree) -> PyTree:
        """The optimizer state (on a mesh: placed like the params / the mask)."""
        if self.mesh is None:
            return self._opt.init(params)
        if self.shardings is None:
            self._lay_out(params)
        state = self._opt.init(params)
        return sharding_lib.put(state, self._state_shardings(state))

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
            return self._constrain_grads(jax.tree.map(f32, grads))
        return self._constrain_grads(
            jax.tree.map(lambda g, i: f32(gather(g, i)), grads, opt_state.indices))

    def _constrain_grads(self, grads: PyTree) -> PyTree:
        return sharding_lib.constrain(
            grads, None if self.shardings is None else self.shardings["grads"])

    def value_and_grad(self, loss_fn, params: PyTree, opt_state: PyTree):
        """``((loss, aux), grads)`` of ``loss_fn(params) -> (loss, aux)`` (traceable), with
        ``grads`` what the accumulator keeps (:meth:`compress`'s shapes and dtypes).

        Sparse runs with ``sparse_grads`` compute the gradient only at the active
        entries (:mod:`sparsejax.sparse_grads`: no dense weight gradient); otherwise the
        dense gradient is taken and compressed.
        """
        if self.sparse_grads:
            out, grads = sparse_grads_lib.value_and_grad(
                loss_fn, params, opt_state.indices, has_aux=True, backend=self.cfg.backend,
                mesh=self.mesh)
            return out, self._constrain_grads(grads)
        out, grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return out, self.compress(grads, opt_state)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 3))
    def apply(self, params: PyTree, grads: PyTree, opt_state: PyTree
              ) -> tuple[PyTree, PyTree, StepReport]:
        """Clips the (compressed) gradient and steps; params and state are donated.

        A step whose gradient is not finite is skipped: params and state come back bit
        for bit (``StepReport.skipped``)."""
        norm = None if self.cfg.max_grad_norm is not None else global_norm(grads)
        update = self._opt.update if self._update is None else self._update
        params, opt_state, info = update(params, grads, opt_state)
        if self.shardings is not None:  # every output where its input was (donation)
            params = sharding_lib.constrain(params, self.shardings["params"])
            opt_state = sharding_lib.constrain(opt_state, self._state_shardings(opt_state))
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

    def base_policy(self, params: PyTree, opt_state: PyTree, *, on_host: bool = False
                    ) -> reference_lib.BasePolicy:
        """How this variant keeps the base policy (:mod:`sparsejax.trainers.reference`):
        the base values of the active entries (sparse), else a copy of ``params`` (on
        the device, or ``on_host`` when they first change)."""
        if self.sparse:
            return reference_lib.SwappedValues(params, opt_state, self.active_values,
                                               self.swap_active)
        return reference_lib.ParamsCopy(params, on_host=on_host)

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
