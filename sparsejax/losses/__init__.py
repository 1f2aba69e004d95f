"""Pure-functional RL losses (GRPO family, DPO family) and group-relative advantages.

Every loss is a jit-able function of arrays returning ``(loss, metrics)``; the string, float
and bool keyword arguments choose the variant (close over them when jitting).
"""

from sparsejax.losses.advantages import ADVANTAGE_SCALES, group_advantages, mean_only_advantages
from sparsejax.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from sparsejax.losses.grpo import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    grpo_loss,
    high_entropy_mask,
    masked_quantile,
)

__all__ = [
    "ADVANTAGE_SCALES",
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "high_entropy_mask",
    "masked_quantile",
    "mean_only_advantages",
]
