"""Adapter settings: train a LoRA adapter (dense, masked, Partial- or Targeted-LoRA)
beside the frozen model instead of the model's own entries."""

from __future__ import annotations

import dataclasses
import json

from sparsejax.config.fields import check_choice, check_fields, setting
from sparsejax.config.names import LORA_RATIOS_FORMAT

ADAPTERS = ("none", "lora", "partial-lora", "targeted-lora")
DEFAULT_TARGETS = "q,k,v,o,gate,up,down"


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Which adapter trains (``kind="none"``: no adapter, the model's own entries train).

    * ``lora``: dense LoRA, or masked LoRA with ``lora_density`` < 1 (random masks on
      the factors);
    * ``partial-lora``: random masks on the factors at the per-layer ratios of the
      ``lora_ratios`` file (:func:`sparsejax.lora.save_ratios`);
    * ``targeted-lora``: the most important factor entries at those ratios.
    """

    kind: str = setting("none", "train a LoRA adapter beside the frozen model (default none: "
                        "the mask of --sparsity)", choices=ADAPTERS, flag="adapter")
    lora_rank: int = setting(8, "LoRA rank r")
    lora_alpha: float = setting(16.0, "LoRA alpha (scale alpha / r)")
    lora_rslora: bool = setting(False, "rank-stabilised scale alpha / sqrt(r)")
    lora_targets: str = setting(
        DEFAULT_TARGETS, "comma-separated projections (q, k, v, o, gate, up, down), module "
        "names (q_proj) or path regexes")
    lora_density: float = setting(
        1.0, "fraction of factor entries trained (--adapter lora; < 1 is masked LoRA)")
    lora_ratios: str | None = setting(
        None, "per-layer ratios JSON (partial-lora, targeted-lora)", metavar="FILE")
    lora_seed: int = setting(0, "seed of the factors' init and masks")

    def __post_init__(self):
        check_choice("adapter", self.kind, ADAPTERS)
        if self.kind == "none":
            return
        check_fields(self, {"lora_rank": {"low": 1}, "lora_seed": {"low": 0},
                            "lora_alpha": {"low": 0.0, "low_open": True},
                            "lora_density": {"low": 0.0, "high": 1.0, "low_open": True}})
        if not self.targets:
            raise ValueError("lora_targets names no target")
        if self.kind == "lora":
            if self.lora_ratios is not None:
                raise ValueError("lora_ratios needs adapter partial-lora or targeted-lora")
            return
        if self.lora_density != 1.0:
            raise ValueError(f"lora_density is for adapter lora; {self.kind} takes its "
                             "densities from lora_ratios")
        if self.lora_ratios is None:
            raise ValueError(f"adapter {self.kind} needs lora_ratios (a ratios file)")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


def check_ratios_file(path: str) -> None:
    """One-line ValueError naming ``path`` unless it is a Partial-LoRA ratios file
    (:func:`sparsejax.lora.save_ratios`); reads JSON only (the ratios themselves are
    checked against the model by :func:`sparsejax.lora.load_ratios`)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"lora_ratios {path}: unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != LORA_RATIOS_FORMAT:
        raise ValueError(f"lora_ratios {path}: not a ratios file")
