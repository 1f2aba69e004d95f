"""Pure-functional RL losses (GRPO family, DPO family, KTO) and group-relative advantages.

Every loss is a jit-able function of arrays returning ``(loss, metrics)``; the string, float
and bool keyword arguments choose the variant (close over them when jitting; the names
are in :mod:`sparsejax.config.names`).
"""

from sparsejax._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    "sparsejax.config.names": ("ADVANTAGE_ESTIMATORS", "ADVANTAGE_SCALES", "DPO_F_DIVERGENCES",
                               "DPO_LOSS_TYPES", "DPO_REFERENCE_FREE_LOSS_TYPES", "GRPO_LOSS_TYPES",
                               "IMPORTANCE_SAMPLING_LEVELS"),
    "sparsejax.losses.advantages": ("group_advantages", "mean_only_advantages",
                                    "rloo_advantages"),
    "sparsejax.losses.dpo": ("dpo_loss",),
    "sparsejax.losses.dpo_family": ("ld_sequence_logps",),
    "sparsejax.losses.kto": ("kto_loss",),
    "sparsejax.losses.grpo": ("grpo_loss", "high_entropy_mask", "masked_quantile"),
})
