"""RL trainers: GRPO, DPO and KTO over whatever trains (:mod:`sparsejax.trainable`)."""

from sparsejax._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    "sparsejax.config": ("DPOConfig", "GRPOConfig", "KTOConfig", "TrainableConfig"),
    "sparsejax.trainers.dpo": ("DPOTrainer",),
    "sparsejax.trainers.grpo": ("GRPOTrainer",),
    "sparsejax.trainers.kto": ("KTOTrainer",),
})
