"""Full finetuning: every parameter trains, stepped by AdamW with float32 master weights.

``optax.adamw`` semantics (:func:`sparsejax.optim.dense_adamw`); for bf16 params the
step keeps float32 master weights and moments (else updates below bf16's resolution are
lost). A checkpoint holds the whole params and the state; the base policy of a KL term
or of DPO is a copy of the params (on the device, or on the host until it is scored).
On a mesh the params, gradients and state are laid out by the rule table of
:mod:`sparsejax.parallel.sharding`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.masks.core import leaves_with_paths
from sparsejax.optim.dense import dense_adamw
from sparsejax.optim.sparse import global_norm
from sparsejax.parallel import sharding as sharding_lib
from sparsejax.trainable import reference as reference_lib
from sparsejax.trainable.base import StepReport, learning_rate_schedule, save_hf_model
from sparsejax.types import PyTree


class FullFinetuning:
    """Every parameter trains (implements :class:`~sparsejax.trainable.base.Trainable`).

    Args:
      cfg: learning rate, warm-up, betas, weight decay, clipping, master weights.
      params: the base params (shapes are enough).
      mesh: a :class:`jax.sharding.Mesh` or mesh spec; None / ``""``: no placement.
      total_steps: the run's optimizer steps (a decaying learning rate or a warm-up
        ratio needs them).
    """

    mask = None
    sparse_grads = False

    def __init__(self, cfg: Any, params: PyTree, *, mesh: Any = None,
                 total_steps: int | None = None):
        self.cfg = cfg
        # per leaf: does cfg.freeze keep it as it is?
        self.frozen = tuple(cfg.freeze is not None and re.search(cfg.freeze, path) is not None
                            for path in leaves_with_paths(params)[0])
        self.mesh = sharding_lib.as_mesh(mesh)
        self.schedule = learning_rate_schedule(cfg, total_steps)
        self._opt = dense_adamw(
            self.schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
            master_weights=cfg.master_weights, skip_nonfinite=True,
            max_grad_norm=cfg.max_grad_norm)
        self.shardings: PyTree | None = None  # the params' (and gradients') shardings

    def describe(self) -> str:
        return "full finetuning" + (f" (freezing {self.cfg.freeze!r})" if any(self.frozen)
                                    else "")

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)

    # ------------------------------------------------------------------ state

    def policy_params(self, params: PyTree) -> PyTree:
        if self.mesh is None:
            return params
        self.shardings = sharding_lib.param_shardings(params, self.mesh)
        return sharding_lib.put(params, self.shardings)

    def _state_shardings(self, opt_state: PyTree) -> PyTree:
        return sharding_lib.like(opt_state, self.shardings, self.shardings, self.mesh)

    def init(self, params: PyTree) -> PyTree:
        if self.mesh is None:
            return self._opt.init(params)
        if self.shardings is None:
            self.shardings = sharding_lib.param_shardings(params, self.mesh)
        state = self._opt.init(params)
        return sharding_lib.put(state, self._state_shardings(state))

    def num_trainable(self, params: PyTree) -> int:
        return int(sum(x.size for x, f in zip(jax.tree.leaves(params), self.frozen) if not f))

    def memory_report(self, params: PyTree, opt_state: PyTree) -> dict[str, int]:
        grads = jax.eval_shape(self.compress, params, opt_state)
        if self.shardings is not None:
            grads = sharding_lib.abstract(grads, self.shardings)
        return sharding_lib.memory_per_device(params, opt_state, grads)

    def save_model(self, folder: str, graphdef: Any, params: PyTree, tokenizer: Any = None
                   ) -> str:
        return save_hf_model(folder, graphdef, params, tokenizer)

    # ------------------------------------------------------------------ gradients

    def compress(self, grads: PyTree, opt_state: PyTree) -> PyTree:
        """The float32 gradient (accumulated in float32 even for bf16 params)."""
        del opt_state
        return sharding_lib.constrain(jax.tree.map(lambda g: g.astype(jnp.float32), grads),
                                      self.shardings)

    def value_and_grad(self, loss_fn, params: PyTree, opt_state: PyTree):
        out, grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return out, self.compress(self._unfrozen(grads, jnp.zeros_like), opt_state)

    def _unfrozen(self, tree: PyTree, frozen_value: Any) -> PyTree:
        """``tree`` with each frozen leaf ``x`` replaced by ``frozen_value(x)``."""
        if not any(self.frozen):
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        return jax.tree.unflatten(treedef, [frozen_value(x) if f else x
                                            for x, f in zip(leaves, self.frozen)])

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 3))
    def apply(self, params: PyTree, grads: PyTree, opt_state: PyTree
              ) -> tuple[PyTree, PyTree, StepReport]:
        norm = None if self.cfg.max_grad_norm is not None else global_norm(grads)
        before = jax.tree.leaves(params)
        params, opt_state, info = self._opt.update(params, grads, opt_state)
        if any(self.frozen):  # weight decay would move a frozen leaf: keep its values
            leaves, treedef = jax.tree.flatten(params)
            params = jax.tree.unflatten(treedef, [b if f else x for x, b, f in zip(
                leaves, before, self.frozen)])
        if self.shardings is not None:  # every output where its input was (donation)
            params = sharding_lib.constrain(params, self.shardings)
            opt_state = sharding_lib.constrain(opt_state, self._state_shardings(opt_state))
        return params, opt_state, StepReport(
            info.grad_norm if norm is None else norm, info.skipped)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_tree(self, params: PyTree, opt_state: PyTree) -> dict[str, PyTree]:
        return {"opt_state": opt_state, "params": params}

    def restore_policy(self, params: PyTree, tree: dict[str, PyTree]
                       ) -> tuple[PyTree, PyTree]:
        del params
        return tree["params"], tree["opt_state"]

    def base_policy(self, params: PyTree, opt_state: PyTree, *, on_host: bool = False
                    ) -> reference_lib.BasePolicy:
        """A copy of ``params`` (on the device, or ``on_host`` when they first change)."""
        del opt_state
        return reference_lib.ParamsCopy(params, on_host=on_host)
