"""KTO (Kahneman-Tversky Optimization) on labelled, unpaired examples with sparse
(default: 1% of the weights) or full finetuning.

The data are examples with ``prompt`` (text or chat messages), ``completion`` (text, or
messages whose last assistant turn is the completion) and ``label`` (true: desirable);
preference pairs (``prompt``/``chosen``/``rejected``) are unpaired. The reference model is
the base model: a sparse run swaps the base values of its active entries in place to
score it (no second copy). ``--sparsity 0`` is full finetuning.

    sparsejax kto                                      # Qwen2.5-0.5B-Instruct, KTO mix
    sparsejax kto --dataset examples.jsonl --sparsity 0 --lr 1e-6
    sparsejax kto --dataset ./data --desirable-weight 1.33     # fewer desirable examples
    sparsejax kto --loss-type apo_zero_unpaired --beta 0.1
    sparsejax kto --config runs/kto/config.yaml --out-dir runs/kto_again

Writes ``metrics.jsonl``, ``checkpoints/``, ``curves.png``, ``final_eval.json``,
``final_model/`` (Hugging Face format) and ``config.yaml`` (the resolved settings) under
``--out-dir``; ``--report-to`` also sends the metrics to TensorBoard or Weights & Biases.
Any flag can come from ``--config FILE.yaml``. (``python experiments/kto.py ...`` is the
same command.)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from sparsejax.cli import training
from sparsejax.cli.dpo import eval_pairs_of, load_pairs
from sparsejax.cli.exits import fail, run_main
from sparsejax.cli.flags import add_flags
from sparsejax.cli.settings import KTODataArgs
from sparsejax.config import KTOConfig

COLUMNS = ("prompt", "completion", "label", "chosen", "rejected")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = training.new_parser(__doc__, prog)
    training.add_model_flags(parser)
    add_flags(parser, KTODataArgs, "data")
    training.add_training_flags(parser, KTOConfig, "KTO")
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None
               ) -> argparse.Namespace:
    args = training.parse(build_parser(prog), argv)
    if args.out_dir is None:
        args.out_dir = "runs/kto"
    return args


def load_examples(name: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    """The examples of ``split`` from a hub dataset, a .jsonl file or a folder."""
    return load_pairs(name, split, limit, COLUMNS, what="examples")


def check_examples(rows: list[dict[str, Any]], what: str) -> None:
    """Raises ValueError naming the first row without a usable prompt/completion/label
    (or, for preference pairs, prompt/chosen/rejected)."""
    from sparsejax.trainers.dpo_data import split_pair
    from sparsejax.trainers.kto_data import is_paired, split_example
    paired = is_paired(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{what} example {i} is not an object")
        try:
            split_pair(row) if paired else split_example(row)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{what} example {i}: {e} (need columns prompt, completion, "
                             "label; or prompt, chosen, rejected)") from e


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from sparsejax.xla_flags import keep_optimization_barriers
    keep_optimization_barriers()  # remat saves memory on a CPU too (before JAX starts)
    try:
        config, sparse, adapter = training.check_offline_args(args, KTODataArgs, KTOConfig)
        train = load_examples(args.dataset, args.split, args.limit)
        check_examples(train, "train")
        evals = eval_pairs_of(args, COLUMNS)
        if evals is not None:
            check_examples(evals, "eval")
        if training.open_out_dir(args):
            return 0
        mesh = training.run_mesh(args)  # after jax.distributed starts: it sees every device
        if mesh is not None:
            from sparsejax.parallel import sharding
            sharding.check_batch("--micro-batch-size", args.micro_batch_size, mesh)
    except ValueError as e:
        fail(str(e))

    # Heavy imports after the argument and data checks, so mistakes answer at once.
    from sparsejax.trainers.kto import KTOTrainer
    return training.run_offline_job(args, KTOTrainer, config, sparse, adapter, mesh, train, evals,
                                    "rows")


def cli(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Runs ``kto`` and exits with its status (:func:`sparsejax.cli.exits.run_main`)."""
    run_main(lambda: main(argv, prog))
