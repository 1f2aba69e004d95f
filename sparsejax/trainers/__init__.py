"""RL trainers: GRPO and DPO over sparse (masked) or full finetuning."""

from sparsejax.trainers.config import GRPOConfig, SparseConfig
from sparsejax.trainers.dpo import DPOTrainer
from sparsejax.trainers.dpo_config import DPOConfig
from sparsejax.trainers.grpo import GRPOTrainer
from sparsejax.trainers.updater import Updater

__all__ = ["DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "SparseConfig", "Updater"]
