"""The adapter flags of the training scripts (``--adapter``, ``--lora-*``).

``add_adapter_args(parser)`` adds them, ``check_adapter_args(args)`` checks them before
anything heavy (no jax import; one-line errors naming the flag or file), and
``build_updater(args, sparse_config, params)`` gives the trainer's ``updater=``
(None for ``--adapter none``: the mask / full finetuning of ``--sparsity``):

* ``lora``: dense LoRA, or masked LoRA with ``--lora-density`` < 1 (random masks on the
  factors);
* ``partial-lora``: random masks on the factors at the per-layer ratios of
  ``--lora-ratios FILE`` (:func:`sparsejax.lora.save_ratios`);
* ``targeted-lora``: the most important factor entries at those ratios.

With an adapter the base model is frozen and ``--sparsity`` / ``--mask`` are not used;
the mask seed (``--mask-seed`` when the script has it) draws the factor masks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

ADAPTERS = ("none", "lora", "partial-lora", "targeted-lora")
RATIOS_FORMAT = "sparsejax.lora.ratios"  # sparsejax.lora.ratios.FORMAT


def add_adapter_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adapter (LoRA / Partial-LoRA)")
    group.add_argument("--adapter", default="none", choices=ADAPTERS,
                       help="train a LoRA adapter beside the frozen model (default none: "
                            "the mask of --sparsity)")
    group.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    group.add_argument("--lora-alpha", type=float, default=16.0,
                       help="LoRA alpha (scale alpha / r)")
    group.add_argument("--lora-rslora", action="store_true",
                       help="rank-stabilised scale alpha / sqrt(r)")
    group.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                       help="comma-separated projections (q, k, v, o, gate, up, down), "
                            "module names (q_proj) or path regexes")
    group.add_argument("--lora-density", type=float, default=1.0,
                       help="fraction of factor entries trained (--adapter lora; < 1 is "
                            "masked LoRA)")
    group.add_argument("--lora-ratios", default=None, metavar="FILE",
                       help="per-layer ratios JSON (partial-lora, targeted-lora)")
    group.add_argument("--lora-seed", type=int, default=0,
                       help="seed of the factors' init and masks")


def check_adapter_args(args: argparse.Namespace) -> None:
    """One-line ValueError naming the flag (or file) for bad adapter flags."""
    if args.adapter == "none":
        return
    if args.lora_rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {args.lora_rank}")
    if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ValueError(f"--lora-alpha must be a finite number > 0, got {args.lora_alpha}")
    if not 0.0 < args.lora_density <= 1.0:
        raise ValueError(f"--lora-density must be in (0, 1], got {args.lora_density}")
    if not [t for t in args.lora_targets.split(",") if t.strip()]:
        raise ValueError("--lora-targets names no target")
    if args.adapter == "lora":
        if args.lora_ratios is not None:
            raise ValueError("--lora-ratios needs --adapter partial-lora or targeted-lora")
        return
    if args.lora_density != 1.0:
        raise ValueError(f"--lora-density is for --adapter lora; {args.adapter} takes its "
                         "densities from --lora-ratios")
    if args.lora_ratios is None:
        raise ValueError(f"--adapter {args.adapter} needs --lora-ratios FILE")
    try:
        with open(args.lora_ratios, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--lora-ratios {args.lora_ratios}: unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != RATIOS_FORMAT:
        raise ValueError(f"--lora-ratios {args.lora_ratios}: not a ratios file")


def build_updater(args: argparse.Namespace, sparse: Any, params: Any,
                  model_name: str | None = None, mesh: Any = None):
    """The trainer's ``updater=`` for the adapter flags (None for ``--adapter none``).
    Checks the adapter against ``params`` (targets, rank, ratios file's model); lays it
    out on ``mesh`` (the run's, or None)."""
    if args.adapter == "none":
        return None
    from sparsejax import lora  # pylint: disable=import-outside-toplevel
    cfg = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                          targets=args.lora_targets, rslora=args.lora_rslora)
    adapters = lora.init_adapters(params, cfg, seed=args.lora_seed)
    mask = None
    if args.adapter == "lora" and args.lora_density < 1.0:
        mask = lora.factor_masks(adapters, args.lora_density, seed=args.lora_seed)
    elif args.adapter != "lora":
        ratios = lora.load_ratios(args.lora_ratios, params, model=model_name)
        if args.adapter == "partial-lora":
            mask = lora.partial_lora_masks(adapters, ratios, seed=args.lora_seed)
        else:
            settings = ratios.settings
            mask = lora.targeted_lora_masks(
                adapters, ratios, params, importance=settings.get("importance", "leverage"),
                svd_rank=int(settings.get("svd_rank", 8)))
    return lora.LoraUpdater(sparse, params, cfg, adapters=adapters, mask=mask, mesh=mesh)


def adapter_run_info(args: argparse.Namespace) -> dict[str, Any]:
    """The adapter settings for the run's identity (a resume must not change them)."""
    if args.adapter == "none":
        return {}
    return {"adapter": args.adapter, "lora_rank": args.lora_rank,
            "lora_alpha": args.lora_alpha, "lora_rslora": args.lora_rslora,
            "lora_targets": args.lora_targets, "lora_density": args.lora_density,
            "lora_ratios": None if args.lora_ratios is None
            else os.path.abspath(args.lora_ratios), "lora_seed": args.lora_seed}
