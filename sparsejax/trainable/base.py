"""The "what trains" contract: one Protocol every variant implements.

A trainer (GRPO, DPO) holds a :class:`Trainable` and never asks which one it got: full
finetuning (:class:`~sparsejax.trainable.full.FullFinetuning`), sparse entries
(:class:`~sparsejax.trainable.sparse.SparseEntries`) or a LoRA adapter
(:class:`~sparsejax.trainable.lora.LoraAdapter`), built by
:func:`sparsejax.trainable.build_trainable` from a
:class:`~sparsejax.config.TrainableConfig`. The run's life around it (checkpoints,
resume, the reference policy of a KL term or of DPO, saving the model, the memory
record) goes through the same methods.

The life of a step::

    params = t.policy_params(base_params)          # what the decoder sees, placed
    opt_state = t.init(params)
    (loss, aux), g = t.value_and_grad(loss_fn, params, opt_state)   # per micro-batch
    acc = g (+ g ...) / n                           # shapes of t.compress(...)
    params, opt_state, report = t.apply(params, acc, opt_state)     # donates both
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.trainable.reference import BasePolicy, SwappedValues
from sparsejax.types import PyTree


class StepReport(NamedTuple):
    """What :meth:`Trainable.apply` tells about a step: the gradient's global norm
    (before clipping) and whether a non-finite gradient skipped it."""

    grad_norm: jax.Array
    skipped: jax.Array


@runtime_checkable
class Trainable(Protocol):
    """What trains in a run and how it steps (see the module docstring).

    Attributes:
      cfg: the run's :class:`~sparsejax.config.TrainableConfig`.
      schedule: the learning rate as a function of the step count.
      mesh: the :class:`jax.sharding.Mesh` the run is laid out on, or None.
      mask: the mask over what trains (a :mod:`sparsejax.masks` mask over the params, or
        over the LoRA factors), or None when every parameter trains.
      sparse_grads: whether gradients are computed only at the mask's entries.
    """

    cfg: Any
    schedule: optax.Schedule
    mesh: Any
    mask: PyTree | None
    sparse_grads: bool

    def describe(self) -> str:
        """A few words on what trains, for a run's first line."""

    def settings(self) -> dict[str, Any]:
        """The settings a resume must not change (they join the run's identity)."""

    def policy_params(self, params: PyTree) -> PyTree:
        """The params the decoder sees, built from the base ``params`` (placed on the
        mesh by the rule table when there is one)."""

    def init(self, params: PyTree) -> PyTree:
        """The optimizer state of the policy params (placed like what it steps)."""

    def num_trainable(self, params: PyTree) -> int:
        """How many values train."""

    def compress(self, grads: PyTree, opt_state: PyTree) -> PyTree:
        """What the gradient accumulator keeps of a gradient of the policy params
        (traceable): float32, at the trained entries only where only those train."""

    def value_and_grad(self, loss_fn: Callable[[PyTree], tuple[jax.Array, Any]],
                       params: PyTree, opt_state: PyTree) -> tuple[tuple[jax.Array, Any], PyTree]:
        """``((loss, aux), grads)`` of ``loss_fn(params)`` (traceable), ``grads`` in the
        accumulator's shapes (:meth:`compress`)."""

    def apply(self, params: PyTree, grads: PyTree, opt_state: PyTree
              ) -> tuple[PyTree, PyTree, StepReport]:
        """Clips the accumulated gradient and steps; ``params`` and ``opt_state`` are
        donated. A non-finite gradient skips the step bit for bit."""

    def checkpoint_tree(self, params: PyTree, opt_state: PyTree) -> dict[str, PyTree]:
        """What a checkpoint keeps of the policy (always the optimizer state)."""

    def restore_policy(self, params: PyTree, tree: dict[str, PyTree]
                       ) -> tuple[PyTree, PyTree]:
        """``(params, opt_state)`` from a restored :meth:`checkpoint_tree`; ``params``
        are the policy params the run started from."""

    def base_policy(self, params: PyTree, opt_state: PyTree, *, on_host: bool = False
                    ) -> BasePolicy:
        """How the base (reference) policy is kept (:mod:`sparsejax.trainable.reference`)."""

    def save_model(self, folder: str, graphdef: Any, params: PyTree, tokenizer: Any = None
                   ) -> str:
        """The trained policy in Hugging Face format in ``folder``; returns ``folder``."""

    def memory_report(self, params: PyTree, opt_state: PyTree) -> dict[str, int]:
        """Bytes per device of the params, the optimizer state and the gradient
        accumulator."""


class TrainsMaskedValues:
    """Checkpoints and the base policy of a variant whose trained state is the values at
    a mask's entries (sparse entries of the params, the factors of a LoRA adapter).

    The subclass provides ``active_values(params, opt_state)`` (the trained values) and
    ``swap_active(params, indices, values) -> (params, previous values)`` (in place). A
    checkpoint holds only the optimizer state (with the mask) and the trained values;
    the base policy is the base values swapped in to score (no second model copy).
    """

    active_values: Callable[[PyTree, PyTree], PyTree]
    swap_active: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]

    def checkpoint_tree(self, params: PyTree, opt_state: PyTree) -> dict[str, PyTree]:
        return {"opt_state": opt_state, "active_values": self.active_values(params, opt_state)}

    def restore_policy(self, params: PyTree, tree: dict[str, PyTree]
                       ) -> tuple[PyTree, PyTree]:
        """``params`` must be the policy params the run started from: the trained values
        are written into them in place, bit for bit."""
        opt_state = tree["opt_state"]
        params, _ = self.swap_active(params, opt_state.indices, tree["active_values"])
        return params, opt_state

    def base_policy(self, params: PyTree, opt_state: PyTree, *, on_host: bool = False
                    ) -> BasePolicy:
        del on_host
        return SwappedValues(params, opt_state, self.active_values, self.swap_active)


def warmup_steps(cfg: Any, total_steps: int | None = None) -> int:
    """The warm-up's length: ``cfg.warmup_steps``, or ``ceil(cfg.warmup_ratio x
    total_steps)`` when the ratio is set (transformers' rule)."""
    ratio = getattr(cfg, "warmup_ratio", 0.0)
    if ratio <= 0:
        return int(cfg.warmup_steps)
    if total_steps is None:
        raise ValueError("warmup_ratio is a fraction of the run's steps: build the trainable "
                         "with total_steps")
    return math.ceil(total_steps * ratio)


def learning_rate_schedule(cfg: Any, total_steps: int | None = None) -> optax.Schedule:
    """The learning rate as a function of the optimizer's step count (kept in its state,
    so a restored checkpoint goes on where it stopped).

    A linear warm-up from 0 over :func:`warmup_steps`, then ``cfg.learning_rate``
    (``lr_scheduler_type="constant"``) or a decay to 0 at step ``total_steps`` (the run's
    steps): ``linear`` or ``cosine`` (half a cosine). Step ``k`` (from 0) gets exactly the
    learning rate transformers' ``get_scheduler`` gives it (``constant`` is its
    ``constant_with_warmup``, the same as its ``constant`` without warm-up); past
    ``total_steps`` the decayed rate stays 0.
    """
    kind = getattr(cfg, "lr_scheduler_type", "constant")
    lr = cfg.learning_rate
    warmup = warmup_steps(cfg, total_steps)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif total_steps is None:
        raise ValueError(f"lr_scheduler_type {kind} decays over the run's steps: build the "
                         "trainable with total_steps")
    elif kind == "linear":
        after = optax.linear_schedule(lr, 0.0, max(1, total_steps - warmup))
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
    else:
        raise ValueError(f"unknown lr_scheduler_type {kind!r}")
    if warmup > 0:
        after = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])
    if kind == "constant":
        return after
    # float32's cos(pi) is not exactly -1: the end of the decay would be -1e-8 x lr.
    return lambda count: jnp.maximum(after(count), 0.0)


def tree_bytes(tree: PyTree) -> int:
    """Bytes of the arrays of ``tree``."""
    return int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def save_hf_model(folder: str, graphdef: Any, params: PyTree, tokenizer: Any = None) -> str:
    """The policy in Hugging Face format (safetensors + config + tokenizer)."""
    from flax import nnx

    from sparsejax.models.hf_io import save_hf
    return save_hf(nnx.merge(graphdef, params), folder, tokenizer=tokenizer)


def trainer_mesh(mesh: Any, config_mesh: str, trainable: Trainable | None = None) -> Any:
    """A trainer's mesh: its ``mesh=`` argument, else its config's ``mesh`` field; a given
    trainable must have been built on the same mesh (its ``mesh``)."""
    from sparsejax.parallel.sharding import as_mesh, mesh_name
    mesh = as_mesh(mesh if mesh is not None else config_mesh)
    if trainable is not None:
        theirs = trainable.mesh
        if mesh is None:
            return theirs
        if theirs is None or mesh_name(theirs) != mesh_name(mesh):
            raise ValueError(f"mesh {mesh_name(mesh)!r}: the given trainable was built on "
                             f"mesh {mesh_name(theirs)!r}; pass it mesh= as well")
    return mesh


def memory_record(trainable: Trainable, params: PyTree, opt_state: PyTree, mesh: Any
                  ) -> dict[str, Any]:
    """The layout part of a run's first metrics record: the mesh and bytes per device
    of params, optimizer state and gradient accumulator."""
    from sparsejax.parallel.sharding import mesh_name
    return {"mesh": mesh_name(mesh), "devices": 1 if mesh is None else int(mesh.size),
            **trainable.memory_report(params, opt_state)}


def zero_gradient(trainable: Trainable, params: PyTree, opt_state: PyTree) -> PyTree:
    """A zero gradient accumulator: the shapes, dtypes and placement of
    ``trainable.compress`` of a gradient of ``params`` (traceable; jit it)."""
    return jax.tree.map(jnp.zeros_like, trainable.compress(params, opt_state))
