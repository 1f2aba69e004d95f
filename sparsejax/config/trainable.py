"""What trains and how the optimizer steps it (one dataclass for every variant)."""

from __future__ import annotations

import dataclasses
import re

from sparsejax.config import names
from sparsejax.config.fields import check_choice, check_fields, setting
from sparsejax.config.names import BACKENDS, LR_SCHEDULER_TYPES

MASK_STRATEGIES = ("auto", *names.MASK_STRATEGIES)
SPARSE_GRADS = ("auto", "on", "off")
SPARSE_LR, FULL_LR = 1e-4, 1e-6  # the Multiple Ticket Hypothesis run's learning rates


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """Which weights train and how the optimizer steps them.

    ``sparsity=0`` (and no ``mask_path``) is full finetuning with AdamW; otherwise a
    random mask (the Multiple Ticket Hypothesis draws ``per_tensor``) or the mask in
    ``mask_path`` selects the trained entries and the fused sparse AdamW steps them. A LoRA
    adapter (:class:`~sparsejax.config.AdapterConfig`) uses the optimizer settings here.
    ``learning_rate=None`` is 1e-4 for sparse entries and 1e-6 for full finetuning (the
    paper's); ``max_grad_norm`` None or <= 0 disables clipping. The learning rate warms up
    linearly from 0 over ``warmup_steps`` (or ``ceil(warmup_ratio x steps)``), then stays
    (``constant``) or decays to 0 at the run's last step (``linear``, ``cosine``), as
    transformers' ``get_scheduler`` (whose ``constant_with_warmup`` is ``constant`` here).
    """

    sparsity: float = setting(0.99, "fraction of weights frozen; 0 = full finetuning (AdamW)")
    mask_seed: int = setting(0, "seed of the random mask")
    mask_strategy: str = setting(
        "auto", "auto: row_balanced with a mesh (the step stays on each device's rows), "
        "per_tensor without", choices=MASK_STRATEGIES)
    mask_path: str | None = setting(
        None, "train the entries of a saved mask (sparsejax.save_mask) instead")
    freeze: str | None = setting(
        None, "regex on parameter paths (as in mask files, e.g. 'mlp/gate/' for a MoE "
        "router): the tensors it matches never train, sparse or full")
    learning_rate: float | None = setting(
        None, f"learning rate (default: {SPARSE_LR:g} sparse, {FULL_LR:g} full, as the paper)",
        flag="lr")
    warmup_steps: int = setting(0, "linear warm-up of the learning rate, in steps")
    warmup_ratio: float = setting(
        0.0, "linear warm-up over this fraction of the run's steps (rounded up; instead of "
        "warmup_steps)")
    lr_scheduler_type: str = setting(
        "constant", "the learning rate after warm-up: constant, or decaying linearly or "
        "along a half cosine to 0 at the run's last step", choices=LR_SCHEDULER_TYPES)
    weight_decay: float = setting(0.0, "decoupled weight decay (AdamW)")
    b1: float = setting(0.9, "AdamW beta1", cli=False)
    b2: float = setting(0.999, "AdamW beta2", cli=False)
    max_grad_norm: float | None = setting(
        1.0, "clip the (trained) gradient to this global norm; <= 0 disables")
    backend: str = setting("auto", "sparse step implementation", choices=BACKENDS)
    master_weights: bool | None = setting(
        None, "float32 master copies of the trained values (None: when params are not "
        "float32)", cli=False)
    sparse_grads: str = setting(
        "auto", "sparse runs: weight gradients only at the active entries (auto: on where "
        "bench_train_step.py measured it faster: up to 10% density on CPU with the C++ "
        "kernel, 1% otherwise)", choices=SPARSE_GRADS)

    def __post_init__(self):
        check_fields(self, {"sparsity": {"low": 0.0, "high": 1.0, "high_open": True},
                            "mask_seed": {"low": 0}, "warmup_steps": {"low": 0},
                            "warmup_ratio": {"low": 0.0, "high": 1.0},
                            "weight_decay": {"low": 0.0}, "b1": {"low": 0.0, "high": 1.0,
                                                                 "high_open": True},
                            "b2": {"low": 0.0, "high": 1.0, "high_open": True},
                            "learning_rate": {"low": 0.0, "low_open": True,
                                              "allow_none": True},
                            "max_grad_norm": {"allow_none": True}})
        check_choice("mask_strategy", self.mask_strategy, MASK_STRATEGIES)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("sparse_grads", self.sparse_grads, SPARSE_GRADS)
        check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULER_TYPES)
        if self.freeze is not None:
            try:
                re.compile(self.freeze)
            except re.error as e:
                raise ValueError(f"freeze {self.freeze!r} is not a regular expression "
                                 f"({e})") from None
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise ValueError("warmup_steps and warmup_ratio both set; give one of them")
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", FULL_LR if self.dense else SPARSE_LR)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            object.__setattr__(self, "max_grad_norm", None)

    @property
    def dense(self) -> bool:
        """Full finetuning: no mask (``sparsity=0`` and no ``mask_path``)."""
        return self.sparsity == 0.0 and self.mask_path is None
