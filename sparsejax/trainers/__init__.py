"""RL trainers: GRPO and DPO over sparse (masked) or full finetuning."""

from sparsejax.trainers.config import GRPOConfig, SparseConfig
from sparsejax.trainers.grpo import GRPOTrainer
from sparsejax.trainers.updater import Updater

__all__ = ["GRPOConfig", "GRPOTrainer", "SparseConfig", "Updater"]
