"""KTO run settings, and the checks of the KTO loss options (shared with
:func:`sparsejax.losses.kto.kto_loss`)."""

from __future__ import annotations

import dataclasses

from sparsejax.config.fields import check_choice, check_fields, check_range, setting
from sparsejax.config.names import KTO_KL_LOSS_TYPES, KTO_LOSS_TYPES
from sparsejax.config.run import RunConfig


def check_kto_options(loss_type: str, *, beta: float, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> None:
    """Checks a KTO loss's options; raises a one-line ValueError naming the option."""
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    check_range("beta", beta, low=0.0, low_open=True)
    check_range("desirable_weight", desirable_weight, low=0.0)
    check_range("undesirable_weight", undesirable_weight, low=0.0)
    if desirable_weight == 0.0 and undesirable_weight == 0.0:
        raise ValueError("desirable_weight and undesirable_weight are both 0: nothing to train")


@dataclasses.dataclass(frozen=True)
class KTOConfig(RunConfig):
    """KTO run settings (with :class:`RunConfig`'s loop, evaluation and layout).

    Each step takes ``batch_size`` labelled examples (consecutive slices of per-epoch
    permutations of the dataset, seeded by ``seed``) and runs them ``micro_batch_size`` at
    a time, accumulating the gradient for one optimizer step. ``kto`` estimates its KL
    reference point per micro-batch from mismatched pairs (each prompt with the previous
    example's completion), so its micro-batches hold at least 2 examples. With a mesh,
    ``micro_batch_size`` must be a multiple of ``data x fsdp``.
    """

    batch_size: int = setting(8, "examples per step")
    micro_batch_size: int = setting(
        4, "examples per forward/backward pass (gradients accumulate; the KL reference point "
        "is estimated over it); divides batch_size")
    beta: float = setting(0.1, "inverse temperature of the implicit reward")
    loss_type: str = setting("kto", "the loss: kto (the paper's) or apo_zero_unpaired",
                             choices=KTO_LOSS_TYPES)
    desirable_weight: float = setting(
        1.0, "weight of the desirable examples' losses (balances unequal counts)")
    undesirable_weight: float = setting(
        1.0, "weight of the undesirable examples' losses (balances unequal counts)")
    max_prompt_length: int = setting(512, "prompt tokens kept (truncated from the left)")
    max_completion_length: int = setting(
        512, "completion tokens kept, EOS included (truncated from the right)")
    eval_limit: int | None = setting(256, "evaluate on the first N eval examples (none: all)")

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, {"batch_size": {"low": 1}, "micro_batch_size": {"low": 1},
                            "max_prompt_length": {"low": 1},
                            "max_completion_length": {"low": 1},
                            "eval_limit": {"low": 1, "allow_none": True}})
        check_kto_options(self.loss_type, beta=self.beta,
                          desirable_weight=self.desirable_weight,
                          undesirable_weight=self.undesirable_weight)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        if self.uses_kl and self.micro_batch_size < 2:
            raise ValueError(f"micro_batch_size must be >= 2 for loss_type {self.loss_type!r} "
                             "(its KL estimate pairs each prompt with another example's "
                             "completion), got 1")

    @property
    def uses_kl(self) -> bool:
        """Whether the loss estimates the KL reference point (scores mismatched pairs)."""
        return self.loss_type in KTO_KL_LOSS_TYPES

    needs_reference = True  # every KTO loss compares the policy with the reference

    def loss_options(self) -> dict:
        """The keyword arguments of :func:`sparsejax.losses.kto.kto_loss` these settings give."""
        return {"beta": self.beta, "loss_type": self.loss_type,
                "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight}
