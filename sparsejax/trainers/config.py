"""Configuration of the RL trainers, kept apart from the code that runs them."""

from __future__ import annotations

import dataclasses
import math


def _check_remat(remat: str) -> None:
    from sparsejax.models.config import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Which weights train and how the optimizer steps them.

    ``sparsity=0`` is full finetuning with dense ``optax.adamw``; otherwise a random
    mask (the Multiple Ticket Hypothesis draws ``per_tensor``) or one loaded from
    ``mask_path`` selects the trained entries and the fused sparse AdamW steps them.
    ``mask_strategy="auto"`` draws ``row_balanced`` masks when the run has a mesh (so
    the step stays on the devices under FSDP) and ``per_tensor`` (the papers' draw)
    without one; any other value is used as given.
    """

    sparsity: float = 0.99
    mask_seed: int = 0
    mask_strategy: str = "auto"  # auto | per_tensor | global | row_balanced
    mask_path: str | None = None
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    max_grad_norm: float | None = 1.0
    backend: str = "auto"
    master_weights: bool | None = None  # None: on when params are not float32
    sparse_grads: str = "auto"  # on|off|auto: weight gradients only at the mask (sparse runs)

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name in ("learning_rate", "weight_decay", "b1", "b2"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0 or not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError("weight_decay must be >= 0 and b1, b2 in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.mask_strategy not in ("auto", "per_tensor", "global", "row_balanced"):
            raise ValueError("mask_strategy must be auto, per_tensor, global or "
                             f"row_balanced, got {self.mask_strategy!r}")
        if self.sparse_grads not in ("auto", "on", "off"):
            raise ValueError(f"sparse_grads must be auto, on or off, got {self.sparse_grads!r}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm)
                                                   and self.max_grad_norm > 0):
            raise ValueError("max_grad_norm must be a finite number > 0 (or None to "
                             "disable clipping)")

    @property
    def dense(self) -> bool:
        return self.sparsity == 0.0 and self.mask_path is None


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO run settings; defaults follow the Multiple Ticket Hypothesis GSM8K run.

    Each step takes ``prompts_per_step`` prompts, samples ``num_generations``
    completions for each, scores them, and takes one optimizer step on the
    group-relative advantages (on-policy: the importance ratio is 1 and clipping only
    matters through its gradient).

    ``mesh`` lays the run out on devices (:func:`sparsejax.sharding.parse_mesh`:
    ``""`` one device, ``"auto"`` every device on FSDP, ``"data=2,fsdp=4"``); then
    ``micro_batch_size``, ``prompts_per_step`` and the generation batch must be
    multiples of ``data x fsdp``.
    """

    steps: int = 100
    prompts_per_step: int = 32
    num_generations: int = 16
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int = 128  # sequences sampled at once
    micro_batch_size: int = 8  # sequences per forward/backward pass
    loss_type: str = "grpo"
    advantage_scale: str = "none"  # reward - group mean, as the paper
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    kl_bias_correction: bool = True  # TRL's GRPO default (use_bias_correction_kl=True)
    top_entropy_quantile: float = 1.0
    logprob_chunk_size: int = 1024
    remat: str = "layer"  # decoder rematerialization: none | layer | dots (DecoderConfig.remat)
    eval_every: int = 0  # 0: only at the end
    eval_limit: int | None = None
    eval_temperature: float = 0.0  # 0: greedy
    eval_batch_size: int = 64
    eval_max_new_tokens: int | None = None  # None: max_new_tokens
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    mesh: str = ""  # "" one device | auto | data=D,fsdp=F (sparsejax.sharding)

    def __post_init__(self):
        for name in ("steps", "prompts_per_step", "num_generations", "max_new_tokens",
                     "generation_batch_size", "micro_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: advantages compare a group")
        if (self.prompts_per_step * self.num_generations) % self.micro_batch_size:
            raise ValueError("prompts_per_step * num_generations must be a multiple of "
                             "micro_batch_size")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError("temperature must be > 0 for GRPO sampling")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            raise ValueError(f"eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError("top_entropy_quantile must be in (0, 1]")
        _check_remat(self.remat)
