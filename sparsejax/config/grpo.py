"""GRPO run settings; defaults follow the Multiple Ticket Hypothesis GSM8K run."""

from __future__ import annotations

import dataclasses

from sparsejax.config.fields import check_choice, check_fields, setting
from sparsejax.config.names import (
    ADVANTAGE_ESTIMATORS,
    ADVANTAGE_SCALES,
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
)
from sparsejax.config.run import RunConfig


@dataclasses.dataclass(frozen=True)
class GRPOConfig(RunConfig):
    """GRPO run settings (with :class:`RunConfig`'s loop, evaluation and layout).

    Each optimizer step trains on ``prompts_per_step`` prompts with ``num_generations``
    completions each, in micro-batches of ``micro_batch_size`` sequences. By default
    every step samples its own completions (on-policy: the importance ratio is 1 and
    clipping only matters through its gradient). As in TRL, one *generation batch* can
    also feed several optimizer steps: ``steps_per_generation`` micro-batches are sampled
    at once (a multiple of one step's), and ``num_iterations`` passes are made over them;
    the log-probs of the policy that sampled them are then recorded, so the importance
    ratio, clipping and ``epsilon_high`` act. With a mesh, ``micro_batch_size``,
    ``prompts_per_step`` and the generation batch must be multiples of ``data x fsdp``.
    """

    prompts_per_step: int = setting(32, "prompts per step")
    num_generations: int = setting(16, "samples per prompt")
    max_new_tokens: int = setting(1024, "completion budget of training samples")
    temperature: float = setting(1.0, "sampling temperature")
    top_p: float = setting(1.0, "nucleus sampling: keep the top-p probability mass")
    top_k: int = setting(0, "sample among the k likeliest tokens (0: all)")
    generation_batch_size: int = setting(128, "sequences sampled at once")
    micro_batch_size: int = setting(
        8, "sequences per forward/backward pass (gradients accumulate)")
    num_iterations: int = setting(
        1, "optimizer passes over each generation batch (TRL's num_iterations, the GRPO "
        "paper's mu); above 1 the importance ratio and clipping act")
    steps_per_generation: int | None = setting(
        None, "micro-batches sampled at once (TRL's steps_per_generation), a multiple of "
        "one optimizer step's; default: one step's")
    loss_type: str = setting(
        "grpo", "the policy loss and how it is averaged (TRL's loss_type; rloo: TRL's RLOO "
        "loss)", choices=GRPO_LOSS_TYPES)
    importance_sampling_level: str = setting(
        "token", "importance ratio per token, or per sequence (GSPO; luspo wants sequence)",
        choices=IMPORTANCE_SAMPLING_LEVELS)
    advantage_estimator: str = setting(
        "grpo", "baseline of the advantage: the group mean (grpo) or the mean of the "
        "group's other completions (rloo)", choices=ADVANTAGE_ESTIMATORS)
    advantage_scale: str = setting(
        "none", "divide (reward - baseline) by the group/batch std, or not (paper)",
        choices=ADVANTAGE_SCALES)
    normalize_advantages: bool = setting(
        False, "whiten the advantages over the step's batch (TRL RLOO's normalize_advantages)")
    epsilon: float = setting(0.2, "clip range")
    epsilon_high: float | None = setting(
        None, "upper clip range (DAPO; default: epsilon); cispo: the cap of the ratio (TRL's "
        "reading, default epsilon; ScaleRL uses 5)")
    delta: float | None = setting(
        None, "cap of the unclipped ratio in the clipped loss (INTELLECT-2's two-sided "
        "clipping; meant to be > 1 + epsilon_high)")
    sapo_temperature_pos: float = setting(1.0, "sapo: gate temperature for positive advantages")
    sapo_temperature_neg: float = setting(
        1.05, "sapo: gate temperature for non-positive advantages")
    vespo_k_pos: float = setting(2.0, "vespo: weight exponent k for non-negative advantages")
    vespo_lambda_pos: float = setting(3.0, "vespo: weight decay lambda for non-negative advantages")
    vespo_k_neg: float = setting(3.0, "vespo: weight exponent k for negative advantages")
    vespo_lambda_neg: float = setting(2.0, "vespo: weight decay lambda for negative advantages")
    mask_truncated_completions: bool = setting(
        False, "leave completions that hit --max-new-tokens without a stop token out of the "
        "loss (DAPO; TRL's mask_truncated_completions)")
    entropy_coef: float = setting(
        0.0, "entropy bonus: subtract this times the mean token entropy from the loss")
    beta: float = setting(0.0, "KL coefficient (k3 estimator)")
    kl_bias_correction: bool = setting(
        True, "multiply the per-token KL by the importance ratio (TRL's "
        "use_bias_correction_kl; on by default, as in TRL)")
    top_entropy_quantile: float = setting(
        1.0, "policy gradient on this top fraction of entropy tokens (0.2: 80/20)")
    skip_zero_advantage: bool = setting(
        True, "skip the forward/backward of micro-batches whose sequences all have zero "
        "advantage while no term but the advantage-weighted one has a gradient (beta = 0): "
        "their gradient is exactly zero, so the update is unchanged bit for bit")
    eval_limit: int | None = setting(
        None, "evaluate on the first N test problems (default: all)")
    eval_temperature: float = setting(0.0, "0: greedy; the paper also reports T=0.9")
    eval_batch_size: int = setting(64, "prompts sampled at once in evaluation")
    eval_max_new_tokens: int | None = setting(
        None, "completion budget of evaluation (default: max_new_tokens)")

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, {
            "prompts_per_step": {"low": 1}, "max_new_tokens": {"low": 1},
            "generation_batch_size": {"low": 1}, "micro_batch_size": {"low": 1},
            "eval_batch_size": {"low": 1}, "top_k": {"low": 0},
            "eval_limit": {"low": 1, "allow_none": True},
            "eval_max_new_tokens": {"low": 1, "allow_none": True},
            "temperature": {"low": 0.0, "low_open": True},
            "top_p": {"low": 0.0, "high": 1.0, "low_open": True},
            "epsilon": {"low": 0.0}, "epsilon_high": {"low": 0.0, "allow_none": True},
            "beta": {"low": 0.0}, "delta": {"low": 0.0, "low_open": True, "allow_none": True},
            "sapo_temperature_pos": {"low": 0.0, "low_open": True},
            "sapo_temperature_neg": {"low": 0.0, "low_open": True},
            "vespo_k_pos": {"low": 0.0}, "vespo_lambda_pos": {"low": 0.0},
            "vespo_k_neg": {"low": 0.0}, "vespo_lambda_neg": {"low": 0.0},
            "entropy_coef": {},
            "top_entropy_quantile": {"low": 0.0, "high": 1.0, "low_open": True},
            "eval_temperature": {"low": 0.0}})
        check_fields(self, {"num_generations": {"low": 2}, "num_iterations": {"low": 1},
                            "steps_per_generation": {"low": 1, "allow_none": True}})
        check_choice("loss_type", self.loss_type, GRPO_LOSS_TYPES)
        check_choice("advantage_scale", self.advantage_scale, ADVANTAGE_SCALES)
        check_choice("importance_sampling_level", self.importance_sampling_level,
                     IMPORTANCE_SAMPLING_LEVELS)
        check_choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        if self.loss_type == "rloo":  # TRL's RLOO loss: one clipped term per completion
            for name, want, why in (
                    ("beta", 0.0, "RLOO's KL penalty belongs in the reward"),
                    ("importance_sampling_level", "token", "RLOO's ratio is per sequence"),
                    ("top_entropy_quantile", 1.0, "RLOO has one term per completion"),
                    ("delta", None, "TRL's RLOO loss has no delta")):
                if getattr(self, name) != want:
                    raise ValueError(f"{name} must be {want!r} with loss_type rloo ({why})")
        if (self.prompts_per_step * self.num_generations) % self.micro_batch_size:
            raise ValueError("prompts_per_step * num_generations must be a multiple of "
                             "micro_batch_size")
        if self.steps_per_generation is not None and (
                self.steps_per_generation % self.micro_batches_per_step):
            raise ValueError(
                f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                f"the micro-batches of one optimizer step (prompts_per_step * "
                f"num_generations / micro_batch_size = {self.micro_batches_per_step})")

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches whose gradients one optimizer step accumulates (TRL's
        ``gradient_accumulation_steps``)."""
        return self.prompts_per_step * self.num_generations // self.micro_batch_size

    @property
    def steps_per_generation_batch(self) -> int:
        """Optimizer steps that train on one generation batch in one pass."""
        if self.steps_per_generation is None:
            return 1
        return self.steps_per_generation // self.micro_batches_per_step

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps between two generations: ``steps_per_generation_batch *
        num_iterations`` (1: every step samples its own completions, on-policy)."""
        return self.steps_per_generation_batch * self.num_iterations
