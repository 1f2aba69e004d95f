"""DPO and its family (IPO, SimPO, ORPO, MPO, ...) with sparse (default: 1% of the weights)
or full finetuning.

The data are preference pairs: ``prompt`` (text or chat messages), ``chosen``, ``rejected``
(text, or messages whose last assistant turn is the completion; without ``prompt`` the
turns before it are the prompt). The reference model is the base model: a sparse run
swaps the base values of its active entries in place to score it (no second copy).
``--sparsity 0`` is full finetuning.

    sparsejax dpo                                      # Qwen2.5-0.5B-Instruct, UltraFeedback
    sparsejax dpo --model ./Qwen2.5-0.5B-Instruct --dataset ./prefs \\
        --steps 200 --sparsity 0.99 --lr 1e-4                  # prefs/train.jsonl (+ test.jsonl)
    sparsejax dpo --dataset pairs.jsonl --sparsity 0 --lr 1e-6
    sparsejax dpo --loss-type sigmoid --loss-type bco_pair --loss-type sft \\
        --loss-weights 0.8 --loss-weights 0.2 --loss-weights 1      # MPO: a weighted sum
    sparsejax dpo --loss-type simpo --beta 2 --simpo-gamma 0.5        # SimPO: no reference
    sparsejax dpo --config runs/dpo/config.yaml --out-dir runs/dpo_again

Writes ``metrics.jsonl``, ``checkpoints/``, ``curves.png``, ``final_eval.json``,
``final_model/`` (Hugging Face format) and ``config.yaml`` (the resolved settings) under
``--out-dir``; ``--report-to jsonl,tensorboard,wandb`` also sends the metrics to
TensorBoard (``<out-dir>/tensorboard``) or Weights & Biases. Any flag can come from
``--config FILE.yaml``. (``python experiments/dpo.py ...`` is the same command.)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from sparsejax.cli import training
from sparsejax.cli.checks import check_jsonl
from sparsejax.cli.exits import fail, run_main
from sparsejax.cli.flags import add_flags
from sparsejax.cli.settings import DPODataArgs
from sparsejax.config import DPOConfig


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = training.new_parser(__doc__, prog)
    training.add_model_flags(parser)
    add_flags(parser, DPODataArgs, "data")
    training.add_training_flags(parser, DPOConfig, "DPO")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None
               ) -> argparse.Namespace:
    args = training.parse(build_parser(prog), argv)
    if args.out_dir is None:
        args.out_dir = "runs/dpo"
    return args


def _looks_local(name: str) -> bool:
    return (name.endswith((".jsonl", ".json")) or name.startswith((".", "/", "~"))
            or os.path.exists(name))


PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def load_pairs(name: str, split: str, limit: int | None, columns: Sequence[str] = PAIR_COLUMNS,
               what: str = "pairs") -> list[dict[str, Any]]:
    """Preference pairs of ``split`` from a hub dataset, a .jsonl file or a folder (of a
    hub dataset, the ``columns`` it has)."""
    if _looks_local(name):
        path = os.path.expanduser(name)
        if os.path.isdir(path):
            path = os.path.join(path, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"dataset file {path!r} not found")
        check_jsonl(path)  # names the file and line of a bad record, or an empty file
        from sparsejax.data.jsonl import read_jsonl
        rows = read_jsonl(path)
    else:
        import datasets
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # hub/network/split errors
            raise ValueError(f"cannot load dataset {name!r} split {split!r}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        keep = [c for c in columns if c in ds.column_names]
        rows = ds.select_columns(keep).to_list()
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise ValueError(f"dataset {name!r} split {split!r} has no {what}")
    return rows


def eval_pairs_of(args: argparse.Namespace, columns: Sequence[str] = PAIR_COLUMNS
                  ) -> list[dict[str, Any]] | None:
    """The eval pairs (the first ``--eval-limit``; all with none), or None (no eval split,
    or a single-file dataset)."""
    if not args.eval_split:
        return None
    if _looks_local(args.dataset):
        path = os.path.expanduser(args.dataset)
        if not os.path.isdir(path) or not os.path.isfile(
                os.path.join(path, f"{args.eval_split}.jsonl")):
            return None
    return load_pairs(args.dataset, args.eval_split, args.eval_limit, columns)


def check_pairs(pairs: list[dict[str, Any]], what: str) -> None:
    """Raises ValueError naming the first pair without usable prompt/chosen/rejected."""
    from sparsejax.trainers.dpo import split_pair
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise ValueError(f"{what} pair {i} is not an object")
        try:
            split_pair(pair)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{what} pair {i}: {e} (need columns prompt, chosen, "
                             "rejected)") from e


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from sparsejax.xla_flags import keep_optimization_barriers
    keep_optimization_barriers()  # remat saves memory on a CPU too (before JAX starts)
    try:
        config, sparse, adapter = training.check_offline_args(args, DPODataArgs, DPOConfig)
        train = load_pairs(args.dataset, args.split, args.limit)
        check_pairs(train, "train")
        evals = eval_pairs_of(args)
        if evals is not None:
            check_pairs(evals, "eval")
        if training.open_out_dir(args):
            return 0
        mesh = training.run_mesh(args)  # after jax.distributed starts: it sees every device
        if mesh is not None:
            from sparsejax.parallel import sharding
            sharding.check_batch("--micro-batch-size", args.micro_batch_size, mesh)
    except ValueError as e:
        fail(str(e))

    # Heavy imports after the argument and data checks, so mistakes answer at once.
    from sparsejax.trainers.dpo import DPOTrainer
    return training.run_offline_job(args, DPOTrainer, config, sparse, adapter, mesh, train, evals,
                                    "pairs")


def cli(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Runs ``dpo`` and exits with its status (:func:`sparsejax.cli.exits.run_main`)."""
    run_main(lambda: main(argv, prog))
