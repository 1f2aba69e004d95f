"""DPO run settings."""

from __future__ import annotations

import dataclasses

from sparsejax.config.fields import check_choice, check_fields, setting
from sparsejax.config.names import DPO_LOSS_TYPES
from sparsejax.config.run import RunConfig


@dataclasses.dataclass(frozen=True)
class DPOConfig(RunConfig):
    """DPO run settings (with :class:`RunConfig`'s loop, evaluation and layout).

    Each step takes ``batch_size`` preference pairs (consecutive slices of per-epoch
    permutations of the dataset, seeded by ``seed``), runs them ``micro_batch_size``
    pairs at a time (chosen and rejected completions of a micro-batch share one forward
    pass of ``2 * micro_batch_size`` sequences), accumulates the gradient and takes one
    optimizer step. With a mesh, ``micro_batch_size`` must be a multiple of
    ``data x fsdp``.
    """

    batch_size: int = setting(8, "preference pairs per step")
    micro_batch_size: int = setting(
        4, "pairs per forward/backward pass (gradients accumulate); divides batch_size")
    beta: float = setting(0.1, "inverse temperature of the implicit reward (tau for IPO)")
    loss_type: str = setting("sigmoid", "the DPO loss", choices=DPO_LOSS_TYPES)
    label_smoothing: float = setting(
        0.0, "label-flip probability (cDPO for sigmoid, robust DPO)")
    max_prompt_length: int = setting(512, "prompt tokens kept (truncated from the left)")
    max_completion_length: int = setting(
        512, "completion tokens kept, EOS included (truncated from the right)")
    eval_limit: int | None = setting(256, "evaluate on the first N eval pairs (none: all)")
    reference_free: bool = setting(False, "no reference model (its log-probs are 0)")

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, {"batch_size": {"low": 1}, "micro_batch_size": {"low": 1},
                            "max_prompt_length": {"low": 1},
                            "max_completion_length": {"low": 1},
                            "eval_limit": {"low": 1, "allow_none": True},
                            "beta": {"low": 0.0, "low_open": True}})
        check_choice("loss_type", self.loss_type, DPO_LOSS_TYPES)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        eps = self.label_smoothing
        if self.loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
            raise ValueError(f"label_smoothing for 'sigmoid' must be in [0, 0.5], got {eps}")
        if self.loss_type == "robust" and not 0.0 <= eps < 0.5:
            raise ValueError(f"label_smoothing for 'robust' must be in [0, 0.5), got {eps}")
        if self.loss_type in ("ipo", "hinge") and eps != 0.0:
            raise ValueError(f"label_smoothing must be 0 for loss_type {self.loss_type!r}, "
                             f"got {eps}")
