"""A LoRA adapter trains (a :class:`~sparsejax.trainable.base.Trainable`): the adapter
factors are the trained state, the base kernels are frozen.

The params a trainer holds are the decoder's params with each adapted kernel a
:class:`~sparsejax.lora.adapters.LoraWeight` (:meth:`LoraAdapter.policy_params`), so
sampling, log-probs and losses run on them unchanged. The base kernels are frozen: no
gradient, no optimizer state. The factors are stepped by the fused sparse AdamW of
:mod:`sparsejax.optim` on a mask over the factors: every entry (dense LoRA), or a
masked LoRA / Partial-LoRA mask, so the optimizer state is ``O(trainable entries)``
and the entries off the mask stay zero.

The base policy of a KL term or of DPO is the trained values swapped back (for a fresh
adapter, ``B = 0``: exactly the adapter switched off, with no copy of the model);
``checkpoint_tree`` holds only the optimizer state and the trained factor values,
``restore_policy`` writes them back into the params the run started from, bit for bit;
``save_model`` writes the merged HF model and the PEFT adapter. A trainer takes it as
``GRPOTrainer(..., trainable=LoraAdapter(...))`` (same for DPO), or builds it from the
config with :func:`sparsejax.trainable.build_trainable`.

On a mesh (``mesh=``) it lays out like :class:`~sparsejax.trainable.sparse.SparseEntries`:
the policy params (base kernels and factors) by the rule table of
:mod:`sparsejax.parallel.sharding`, the state like the factors, the default full mask in the
row-balanced layout (every entry of every row, so a row-split factor steps locally).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib
from sparsejax.backends import resolve_backend
from sparsejax.lora.adapters import Adapters, LoraConfig, LoraWeight, attach, check_adapters, detach, init_adapters
from sparsejax.lora.masked import apply_mask, full_masks
from sparsejax.lora.peft_io import save_merged_hf, save_peft
from sparsejax.masks.indexing import gather, scatter
from sparsejax.optim.sharded import per_shard_update
from sparsejax.optim.sparse import fused_sparse_adamw
from sparsejax.parallel import sharding as sharding_lib
from sparsejax.trainable.base import StepReport, TrainsMaskedValues, learning_rate_schedule
from sparsejax.types import PyTree


def _has_lora(tree: PyTree) -> bool:
    return any(isinstance(x, LoraWeight) for x in jax.tree.leaves(
        tree, is_leaf=lambda x: isinstance(x, LoraWeight)))


class LoraAdapter(TrainsMaskedValues):
    """A LoRA adapter trains (see the module docstring).

    Args:
      cfg: learning rate, betas, weight decay, clipping, backend (its sparsity and
        mask fields are not used: the mask is over the factors).
      params: the base params (frozen).
      lora: rank, alpha, targets, rsLoRA.
      adapters: initial factors (e.g. :func:`sparsejax.lora.load_peft`); default a fresh
        PEFT-style init drawn with ``seed``.
      mask: a :mod:`sparsejax.masks` mask over the factors (masked LoRA); default all
        (on a mesh in the row-balanced layout).
      mesh: a :class:`jax.sharding.Mesh` or mesh spec (None / ``""``: no placement).
      kind: what the run's first line calls the adapter (``lora``, ``partial-lora``...).
      total_steps: the run's optimizer steps (a decaying learning rate or a warm-up
        ratio needs them).
    """

    def __init__(self, cfg: Any, params: PyTree, lora: LoraConfig, *,
                 adapters: Adapters | None = None, mask: PyTree | None = None,
                 seed: int = 0, mesh: Any = None, kind: str = "lora",
                 total_steps: int | None = None):
        self.kind = kind
        if _has_lora(params):
            params, _ = detach(params)
        self.cfg, self.lora = cfg, lora
        self.schedule = learning_rate_schedule(cfg, total_steps)
        adapters = init_adapters(params, lora, seed) if adapters is None else adapters
        check_adapters(params, adapters)
        self.mesh = sharding_lib.as_mesh(mesh)
        if mask is None:
            mask = full_masks(adapters)
            if self.mesh is not None:  # every entry, as (rows, cols): follows row splits
                mask = jax.tree.map(
                    lambda i, x: i.reshape(masks_lib.core.rows_cols(np.shape(x))),
                    mask, adapters)
        self.mask = mask
        masks_lib.validate_mask(self.mask, adapters)
        self.initial_adapters = apply_mask(adapters, self.mask)
        master = any(jnp.dtype(x.dtype) != jnp.float32 for x in jax.tree.leaves(adapters))
        self._opt = fused_sparse_adamw(
            self.mask, self.schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
            master_weights=master, skip_nonfinite=True, max_grad_norm=cfg.max_grad_norm,
            backend=cfg.backend)
        self.shardings: dict[str, PyTree] | None = None
        self._update = self._opt.update
        if self.mesh is not None:
            f_sh = sharding_lib.param_shardings(adapters, self.mesh)
            m_sh = sharding_lib.mask_shardings(self.mask, f_sh, self.mesh)
            self.shardings = {"factors": f_sh, "mask": m_sh}
            if sharding_lib.fsdp_size(self.mesh) > 1:
                sharding_lib.warn_if_step_communicates(self.mask, f_sh)
            if resolve_backend(cfg.backend) != "xla":  # the kernel runs per shard
                local = fused_sparse_adamw(
                    self.mask, self.schedule, b1=cfg.b1, b2=cfg.b2,
                    weight_decay=cfg.weight_decay, master_weights=master,
                    skip_nonfinite=False, max_grad_norm=None, backend=cfg.backend)
                self._update = per_shard_update(
                    local.update, self.mesh, f_sh, self.mask, cfg.max_grad_norm)

    sparse_grads = False

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)

    def describe(self) -> str:
        return f"{self.kind} adapter, rank {self.lora.rank}, frozen base"

    # ------------------------------------------------------------------ state

    def policy_params(self, params: PyTree) -> PyTree:
        """The params the decoder sees: ``params`` with (a fresh copy of) the initial
        masked adapters; the steps donate the factors, never the initial ones."""
        if _has_lora(params):
            params, _ = detach(params)
        factors = jax.tree.map(lambda x: jnp.array(x, copy=True), self.initial_adapters)
        policy = attach(params, factors, self.lora.scale)
        if self.mesh is None:
            return policy
        return sharding_lib.put(policy, sharding_lib.param_shardings(policy, self.mesh))

    def adapters(self, params: PyTree) -> Adapters:
        """The current factors held in the policy params."""
        return detach(params)[1]

    def init(self, params: PyTree) -> PyTree:
        """The optimizer state over the factors (on a mesh: placed like the mask)."""
        state = self._opt.init(self._factors(params))
        if self.mesh is None:
            return state
        return sharding_lib.put(state, self._state_shardings(state))

    def _state_shardings(self, state: PyTree) -> PyTree:
        return sharding_lib.like(state, self.mask, self.shardings["mask"], self.mesh)

    def memory_report(self, params: PyTree, opt_state: PyTree) -> dict[str, int]:
        """Bytes per device of the policy params, the optimizer state and the gradient
        accumulator (the compressed factor gradient, placed like the mask)."""
        grads = jax.eval_shape(lambda s: jax.tree.map(
            lambda i: jnp.zeros(i.shape, jnp.float32), s.indices), opt_state)
        if self.shardings is not None:
            grads = sharding_lib.abstract(grads, self.shardings["mask"])
        return sharding_lib.memory_per_device(params, opt_state, grads)

    def num_trainable(self, params: PyTree) -> int:
        del params
        return masks_lib.num_active(self.mask)

    def _factors(self, params: PyTree) -> Adapters:
        if not _has_lora(params):
            raise ValueError("LoraAdapter needs the policy params (LoraAdapter.policy_params)")
        return detach(params)[1]

    def save_model(self, folder: str, graphdef: Any, params: PyTree,
                   tokenizer: Any = None, *, base_model_name_or_path: str | None = None
                   ) -> str:
        """The trained policy as the merged HF checkpoint in ``folder`` and the PEFT
        adapter in ``folder/adapter`` (what PEFT and vLLM load); returns ``folder``."""
        base, factors = detach(params)
        save_merged_hf(folder, graphdef, base, factors, self.lora, tokenizer=tokenizer)
        save_peft(os.path.join(folder, "adapter"), factors, self.lora, params=base,
                  base_model_name_or_path=base_model_name_or_path)
        return folder

    # ------------------------------------------------------------------ gradients

    def compress(self, grads: PyTree, opt_state: PyTree) -> PyTree:
        """float32 gradient values at the trainable factor entries (traceable); ``grads``
        is a gradient of the factors (or policy params, whose factors are used)."""
        if _has_lora(grads):
            grads = detach(grads)[1]
        grads = jax.tree.map(lambda g, i: gather(g, i).astype(jnp.float32), grads,
                             opt_state.indices)
        return sharding_lib.constrain(
            grads, None if self.shardings is None else self.shardings["mask"])

    def value_and_grad(self, loss_fn, params: PyTree, opt_state: PyTree):
        """``((loss, aux), grads)`` of ``loss_fn(params) -> (loss, aux)`` with respect to
        the factors only (the base kernels get no gradient), compressed to the mask."""
        factors = self._factors(params)
        scale = self.lora.scale
        f = lambda ad: loss_fn(attach(params, ad, scale))
        out, grads = jax.value_and_grad(f, has_aux=True)(factors)
        return out, self.compress(grads, opt_state)

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 3))
    def _step(self, factors, grads, opt_state):
        factors, opt_state, info = self._update(factors, grads, opt_state)
        if self.shardings is not None:  # every output where its input was (donation)
            factors = sharding_lib.constrain(factors, self.shardings["factors"])
            opt_state = sharding_lib.constrain(opt_state, self._state_shardings(opt_state))
        return factors, opt_state, StepReport(info.grad_norm, info.skipped)

    def apply(self, params: PyTree, grads: PyTree, opt_state: PyTree
              ) -> tuple[PyTree, PyTree, StepReport]:
        """Clips and steps the trainable factor entries (factors and state donated; the
        base kernels are passed through untouched). A non-finite gradient skips the
        step bit for bit (``StepReport.skipped``)."""
        factors, opt_state, report = self._step(self._factors(params), grads, opt_state)
        return attach(params, factors, self.lora.scale), opt_state, report

    # ------------------------------------------------------------------ checkpoints

    def active_values(self, params: PyTree, opt_state: PyTree) -> PyTree:
        """The trained values (the factor entries on the mask)."""
        return _gather_tree(self._factors(params), opt_state.indices)

    def swap_active(self, params: PyTree, indices: PyTree, values: PyTree
                    ) -> tuple[PyTree, PyTree]:
        """Writes ``values`` at ``indices`` of the factors; returns ``(params, previous)``.
        With the initial values this is the reference policy (adapter off when fresh)."""
        factors, old = _swap_tree(self._factors(params), indices, values)
        return attach(params, factors, self.lora.scale), old


@jax.jit
def _gather_tree(factors, indices):
    return jax.tree.map(gather, factors, indices)


@functools.partial(jax.jit, donate_argnums=0)
def _swap_tree(factors, indices, values):
    old = jax.tree.map(gather, factors, indices)
    new = jax.tree.map(lambda p, i, v: scatter(p, i, v.astype(p.dtype)), factors, indices,
                       values)
    return new, old

