"""Run settings as frozen dataclasses, each setting declared once with its help.

* :class:`TrainableConfig`: what trains (sparsity, mask) and the optimizer.
* :class:`AdapterConfig`: a LoRA / Partial-LoRA adapter instead.
* :class:`RunConfig`: the loop, evaluation, checkpoints and layout every run shares;
  :class:`GRPOConfig`, :class:`DPOConfig` and :class:`KTOConfig` add their algorithm's
  settings.

These modules import only the standard library (and the loss names), so the command
line builds its flags from them (:mod:`sparsejax.cli.flags`) and ``--help`` answers at
once.
"""

from sparsejax.config.adapter import AdapterConfig
from sparsejax.config.dpo import DPOConfig
from sparsejax.config.fields import flag_name, setting
from sparsejax.config.grpo import GRPOConfig
from sparsejax.config.kto import KTOConfig
from sparsejax.config.run import RunConfig
from sparsejax.config.trainable import TrainableConfig

__all__ = ["AdapterConfig", "DPOConfig", "GRPOConfig", "KTOConfig", "RunConfig", "TrainableConfig",
           "flag_name", "setting"]
