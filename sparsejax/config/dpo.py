"""DPO run settings, and the checks of the DPO loss options (shared with
:func:`sparsejax.losses.dpo_loss`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from sparsejax.config.fields import check_choice, check_fields, check_range, setting
from sparsejax.config.names import (
    DPO_F_DIVERGENCE_LOSS_TYPES,
    DPO_F_DIVERGENCES,
    DPO_LOSS_TYPES,
    DPO_REFERENCE_FREE_LOSS_TYPES,
)
from sparsejax.config.run import RunConfig

# The loss types that read label_smoothing, and the range each allows.
_SMOOTHED = {"sigmoid": (0.0, 0.5, False), "aot": (0.0, 0.5, False),
             "aot_unpaired": (0.0, 0.5, False), "simpo": (0.0, 0.5, False),
             "robust": (0.0, 0.5, True), "exo_pair": (0.0, 1.0, True)}


def check_loss_options(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None,
                       *, beta: float, label_smoothing: float = 0.0,
                       ld_alpha: float | None = None, f_divergence_type: str = "reverse_kl",
                       f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05,
                       simpo_gamma: float = 0.5, use_weighting: bool = False
                       ) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Checks a DPO loss's options; returns ``(loss types, their weights)`` as tuples.

    ``loss_type`` is one name or a sequence of names (combined with ``loss_weights``, 1 each
    by default). Raises a one-line ValueError naming the option.
    """
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for name in types:
        check_choice("loss_type", name, DPO_LOSS_TYPES)
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        weights = tuple(loss_weights)
        if len(weights) != len(types):
            raise ValueError(f"loss_weights has {len(weights)} weights for {len(types)} loss "
                             f"types ({'+'.join(types)} in loss_type); give one per loss type")
        for w in weights:
            check_range("loss_weights", w)
        weights = tuple(float(w) for w in weights)
    check_range("beta", beta, low=0.0, low_open=True)
    eps = label_smoothing
    check_range("label_smoothing", eps, low=0.0, high=1.0, high_open=True)
    smoothed = [t for t in types if t in _SMOOTHED]
    if eps != 0.0 and not smoothed:
        raise ValueError(f"label_smoothing must be 0 for loss_type {'+'.join(types)!r} "
                         f"(none of its losses uses it), got {eps}")
    for name in smoothed:
        low, high, open_high = _SMOOTHED[name]
        if name == "exo_pair" and not eps > 0.0:
            raise ValueError("label_smoothing must be > 0 for loss_type 'exo_pair' (EXO's "
                             f"epsilon; 1e-3 is the paper's choice), got {eps}")
        if not (low <= eps <= high and not (open_high and eps == high)):
            bound = ")" if open_high else "]"
            raise ValueError(f"label_smoothing for loss_type {name!r} must be in [{low:g}, "
                             f"{high:g}{bound}, got {eps}")
    check_range("ld_alpha", ld_alpha, low=0.0, high=1.0, allow_none=True)
    check_choice("f_divergence_type", f_divergence_type, DPO_F_DIVERGENCES)
    if f_divergence_type != "reverse_kl":
        other = [t for t in types if t not in DPO_F_DIVERGENCE_LOSS_TYPES]
        if other:
            raise ValueError(f"f_divergence_type {f_divergence_type!r} is defined only for "
                             f"the loss types {', '.join(DPO_F_DIVERGENCE_LOSS_TYPES)}; "
                             f"loss_type has {', '.join(other)}")
    check_range("f_alpha_divergence_coef", f_alpha_divergence_coef)
    check_range("discopop_tau", discopop_tau, low=0.0, low_open=True)
    check_range("simpo_gamma", simpo_gamma)
    if use_weighting and any(t in ("aot", "aot_unpaired") for t in types):
        raise ValueError("use_weighting (WPO) is not defined for loss_type 'aot' or "
                         "'aot_unpaired' (they sort the pairs, so no weight stays with its pair)")
    return types, weights


@dataclasses.dataclass(frozen=True)
class DPOConfig(RunConfig):
    """DPO run settings (with :class:`RunConfig`'s loop, evaluation and layout).

    Each step takes ``batch_size`` preference pairs (consecutive slices of per-epoch
    permutations of the dataset, seeded by ``seed``), runs them ``micro_batch_size``
    pairs at a time (chosen and rejected completions of a micro-batch share one forward
    pass of ``2 * micro_batch_size`` sequences), accumulates the gradient and takes one
    optimizer step. With a mesh, ``micro_batch_size`` must be a multiple of
    ``data x fsdp``.

    ``loss_type`` is one loss or several, summed with ``loss_weights`` (the losses and
    options are those of :func:`sparsejax.losses.dpo_loss`); a plain string is taken as a
    one-loss tuple. A run whose losses all do without a reference (``sft``, ``simpo``,
    ``orpo``) scores none, as with ``reference_free``.
    """

    batch_size: int = setting(8, "preference pairs per step")
    micro_batch_size: int = setting(
        4, "pairs per forward/backward pass (gradients accumulate); divides batch_size")
    beta: float = setting(
        0.1, "inverse temperature of the implicit reward (tau for IPO, lambda for ORPO)")
    loss_type: tuple[str, ...] = setting(
        ("sigmoid",), "the DPO loss; repeat the flag to sum several (weighted by "
        "--loss-weights), e.g. sigmoid, bco_pair, sft for MPO", choices=DPO_LOSS_TYPES)
    loss_weights: tuple[float, ...] | None = setting(
        None, "one weight per --loss-type, repeated in the same order (none: 1 each)")
    label_smoothing: float = setting(
        0.0, "label-flip probability (cDPO for sigmoid, aot, simpo; robust DPO; EXO's epsilon)")
    ld_alpha: float | None = setting(
        None, "LD-DPO: weight of the log-probs past the shorter completion of a pair, in "
        "[0, 1] (none: plain sums)")
    f_divergence_type: str = setting(
        "reverse_kl", "f-DPO's divergence to the reference", choices=DPO_F_DIVERGENCES)
    f_alpha_divergence_coef: float = setting(
        0.5, "alpha of f_divergence_type alpha_divergence")
    use_weighting: bool = setting(
        False, "WPO: weight each pair by the policy's length-normalised probabilities")
    discopop_tau: float = setting(0.05, "temperature of the discopop loss's mixing")
    simpo_gamma: float = setting(0.5, "SimPO's target reward margin gamma")
    max_prompt_length: int = setting(512, "prompt tokens kept (truncated from the left)")
    max_completion_length: int = setting(
        512, "completion tokens kept, EOS included (truncated from the right)")
    eval_limit: int | None = setting(256, "evaluate on the first N eval pairs (none: all)")
    reference_free: bool = setting(False, "no reference model (its log-probs are 0)")

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", (self.loss_type,))
        elif not isinstance(self.loss_type, tuple):
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        if self.loss_weights is not None and not isinstance(self.loss_weights, tuple):
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        super().__post_init__()
        check_fields(self, {"batch_size": {"low": 1}, "micro_batch_size": {"low": 1},
                            "max_prompt_length": {"low": 1},
                            "max_completion_length": {"low": 1},
                            "eval_limit": {"low": 1, "allow_none": True}})
        check_loss_options(self.loss_type, self.loss_weights, beta=self.beta,
                           label_smoothing=self.label_smoothing, ld_alpha=self.ld_alpha,
                           f_divergence_type=self.f_divergence_type,
                           f_alpha_divergence_coef=self.f_alpha_divergence_coef,
                           discopop_tau=self.discopop_tau, simpo_gamma=self.simpo_gamma,
                           use_weighting=self.use_weighting)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")

    @property
    def needs_reference(self) -> bool:
        """Whether the run scores a reference model (not ``reference_free``, and some loss
        uses one)."""
        return not self.reference_free and any(
            t not in DPO_REFERENCE_FREE_LOSS_TYPES for t in self.loss_type)

    def loss_options(self) -> dict:
        """The keyword arguments of :func:`sparsejax.losses.dpo_loss` these settings give."""
        return {"beta": self.beta, "loss_type": self.loss_type,
                "loss_weights": self.loss_weights, "label_smoothing": self.label_smoothing,
                "ld_alpha": self.ld_alpha, "f_divergence_type": self.f_divergence_type,
                "f_alpha_divergence_coef": self.f_alpha_divergence_coef,
                "discopop_tau": self.discopop_tau, "simpo_gamma": self.simpo_gamma,
                "use_weighting": self.use_weighting}
