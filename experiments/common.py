"""Pieces the experiment scripts share: argument groups, model loading, errors.

Scripts import this as ``from common import ...`` (it sits beside them).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from sparsejax.trainers.config import SparseConfig


def fail(message: str) -> NoReturn:
    """Exits with status 2 and a one-line message (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def add_model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="Hugging Face hub id or local folder (config.json + safetensors)")
    group.add_argument("--tokenizer", default=None,
                       help="tokenizer hub id or folder (default: the model's)")
    group.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                       help="parameter dtype")


def add_sparse_args(parser: argparse.ArgumentParser, *, default_lr: float | None) -> None:
    group = parser.add_argument_group("mask and optimizer")
    group.add_argument("--sparsity", type=float, default=0.99,
                       help="fraction of weights frozen; 0 = full finetuning (dense AdamW)")
    group.add_argument("--mask-seed", type=int, default=0, help="seed of the random mask")
    group.add_argument("--mask-strategy", default="per_tensor",
                       choices=["per_tensor", "global", "row_balanced"])
    group.add_argument("--mask-path", default=None,
                       help="train the entries of a saved mask (sparsejax.save_mask) instead")
    group.add_argument("--lr", type=float, default=default_lr,
                       help="learning rate (default: 1e-4 sparse, 1e-6 full, as the paper)"
                       if default_lr is None else "learning rate")
    group.add_argument("--warmup-steps", type=int, default=0)
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="clip the (active) gradient to this global norm; <= 0 disables")
    group.add_argument("--backend", default="auto", choices=["auto", "xla", "pallas", "interpret"],
                       help="sparse step implementation")


def add_run_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out-dir", default=default_out,
                       help="metrics.jsonl, checkpoints/, curves.png, final_eval.json, final_model/")
    group.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    group.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint in --out-dir")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_out_dir(args: argparse.Namespace) -> None:
    """Refuses to start a new run over an earlier run's checkpoints (never lose work)."""
    ckpt = os.path.join(args.out_dir, "checkpoints")
    if not args.resume and os.path.isdir(ckpt) and os.listdir(ckpt):
        raise ValueError(f"{args.out_dir} holds checkpoints of an earlier run: pass --resume "
                         "to continue it, or choose another --out-dir")


def sparse_config(args: argparse.Namespace) -> SparseConfig:
    """The :class:`SparseConfig` of the parsed arguments (raises ValueError if bad)."""
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    lr = args.lr
    if lr is None:
        lr = 1e-6 if args.sparsity == 0 and args.mask_path is None else 1e-4
    if args.mask_path is not None and not os.path.isfile(args.mask_path):
        raise ValueError(f"--mask-path {args.mask_path!r} is not a file")
    return SparseConfig(
        sparsity=args.sparsity, mask_seed=args.mask_seed, mask_strategy=args.mask_strategy,
        mask_path=args.mask_path, learning_rate=lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        backend=args.backend)


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(graphdef, params, tokenizer)`` from ``--model`` / ``--tokenizer`` / ``--dtype``.

    Raises ValueError with a readable message when the model cannot be used.
    """
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    from sparsejax.models import load_hf  # pylint: disable=g-import-not-at-top
    try:
        model = load_hf(args.model, param_dtype=args.dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model,
                                                  trust_remote_code=False)
    except (OSError, NotImplementedError, KeyError) as e:
        raise ValueError(f"cannot load model {args.model!r}: {str(e).splitlines()[0]}") from e
    graphdef, params = nnx.split(model)
    return graphdef, params, tokenizer
