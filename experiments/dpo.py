"""DPO (sigmoid, IPO, hinge, robust) with sparse (default: 1% of the weights) or full finetuning.

The data are preference pairs: ``prompt`` (text or chat messages), ``chosen``, ``rejected``
(text, or messages whose last assistant turn is the completion; without ``prompt`` the
turns before it are the prompt). The reference model is the base model: a sparse run
swaps the base values of its active entries in place to score it (no second copy).
``--sparsity 0`` is full finetuning.

    python experiments/dpo.py                          # Qwen2.5-0.5B-Instruct, UltraFeedback
    python experiments/dpo.py --model ./Qwen2.5-0.5B-Instruct --dataset ./prefs \\
        --steps 200 --sparsity 0.99 --lr 1e-4                  # prefs/train.jsonl (+ test.jsonl)
    python experiments/dpo.py --dataset pairs.jsonl --sparsity 0 --lr 1e-6

Writes ``metrics.jsonl``, ``checkpoints/``, ``curves.png``, ``final_eval.json`` and
``final_model/`` (Hugging Face format) under ``--out-dir``; ``--report-to
jsonl,tensorboard,wandb`` also sends the metrics to TensorBoard (``<out-dir>/tensorboard``)
or Weights & Biases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (add_model_args, add_run_args, add_sparse_args,  # noqa: E402
                    check_jsonl, check_model_folder, check_number, check_numbers,
                    check_run_args, fail, load_model_and_tokenizer, open_out_dir,
                    run_main, run_mesh, sparse_config, train_with_writer, what_trains)
from lora_flags import (add_adapter_args, adapter_run_info, build_updater,  # noqa: E402
                        check_adapter_args)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # sparsejax.losses.DPO_LOSS_TYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, "Qwen/Qwen2.5-0.5B-Instruct")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="trl-lib/ultrafeedback_binarized",
                      help="hub dataset id (datasets.load_dataset), a .jsonl file, or a "
                           "folder with <split>.jsonl [and <eval-split>.jsonl]")
    data.add_argument("--split", default="train", help="training split")
    data.add_argument("--eval-split", default="test",
                      help="evaluation split ('' for none; a single .jsonl file has none)")
    data.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    data.add_argument("--max-prompt-length", type=int, default=512,
                      help="prompt tokens kept (truncated from the left)")
    data.add_argument("--max-completion-length", type=int, default=512,
                      help="completion tokens kept, EOS included (truncated from the right)")
    dpo = parser.add_argument_group("DPO")
    dpo.add_argument("--steps", type=int, default=100)
    dpo.add_argument("--batch-size", type=int, default=8, help="preference pairs per step")
    dpo.add_argument("--micro-batch-size", type=int, default=4,
                     help="pairs per forward/backward pass (gradients accumulate)")
    dpo.add_argument("--beta", type=float, default=0.1, help="inverse temperature")
    dpo.add_argument("--loss-type", default="sigmoid", choices=LOSS_TYPES)
    dpo.add_argument("--label-smoothing", type=float, default=0.0,
                     help="label-flip probability (cDPO for sigmoid, robust DPO)")
    dpo.add_argument("--reference-free", action="store_true",
                     help="no reference model (its log-probs are 0)")
    dpo.add_argument("--logprob-chunk-size", type=int, default=1024,
                     help="tokens projected to the vocabulary at once")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-every", type=int, default=25, help="0: only at the end")
    ev.add_argument("--eval-limit", type=int, default=256,
                    help="evaluate on the first N eval pairs (0: all)")
    add_sparse_args(parser, default_lr=None)
    add_adapter_args(parser)
    add_run_args(parser, "runs/dpo")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.eval_limit is not None and args.eval_limit < 0:
        parser.error(f"--eval-limit must be >= 0, got {args.eval_limit}")
    return args


def _looks_local(name: str) -> bool:
    return (name.endswith((".jsonl", ".json")) or name.startswith((".", "/", "~"))
            or os.path.exists(name))


def load_pairs(name: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Preference pairs of ``split`` from a hub dataset, a .jsonl file or a folder."""
    if _looks_local(name):
        path = os.path.expanduser(name)
        if os.path.isdir(path):
            path = os.path.join(path, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"dataset file {path!r} not found")
        check_jsonl(path)  # names the file and line of a bad record, or an empty file
        from sparsejax.data.jsonl import read_jsonl  # pylint: disable=g-import-not-at-top
        rows = read_jsonl(path)
    else:
        import datasets  # pylint: disable=g-import-not-at-top
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # pylint: disable=broad-except  # hub/network/split errors
            raise ValueError(f"cannot load dataset {name!r} split {split!r}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        keep = [c for c in ("prompt", "chosen", "rejected") if c in ds.column_names]
        rows = ds.select_columns(keep).to_list()
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise ValueError(f"dataset {name!r} split {split!r} has no pairs")
    return rows


def eval_pairs_of(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """The eval pairs, or None (no eval split, or a single-file dataset)."""
    if not args.eval_split:
        return None
    if _looks_local(args.dataset):
        path = os.path.expanduser(args.dataset)
        if not os.path.isdir(path) or not os.path.isfile(
                os.path.join(path, f"{args.eval_split}.jsonl")):
            return None
    return load_pairs(args.dataset, args.eval_split, args.eval_limit or None)


def check_pairs(pairs: list[dict[str, Any]], what: str) -> None:
    """Raises ValueError naming the first pair without usable prompt/chosen/rejected."""
    from sparsejax.trainers.dpo import split_pair  # pylint: disable=g-import-not-at-top
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise ValueError(f"{what} pair {i} is not an object")
        try:
            split_pair(pair)
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{what} pair {i}: {e} (need columns prompt, chosen, "
                             "rejected)") from e


def check_args(args: argparse.Namespace) -> None:
    """Every flag and the model folder, before anything heavy."""
    for name in ("steps", "batch_size", "micro_batch_size", "max_prompt_length",
                 "max_completion_length", "logprob_chunk_size"):
        check_number(args, name, low=1)
    check_number(args, "eval_every", low=0)
    check_numbers(args, {"beta": (0.0, None, True), "label_smoothing": (0.0, 0.5)})
    check_run_args(args)
    check_adapter_args(args)
    check_model_folder(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        sparse = sparse_config(args)
        from sparsejax.trainers.dpo_config import DPOConfig  # pylint: disable=g-import-not-at-top
        config = DPOConfig(
            steps=args.steps, batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size, beta=args.beta, loss_type=args.loss_type,
            label_smoothing=args.label_smoothing, max_prompt_length=args.max_prompt_length,
            max_completion_length=args.max_completion_length, eval_every=args.eval_every,
            eval_limit=args.eval_limit or None, save_every=args.save_every, seed=args.seed,
            logprob_chunk_size=args.logprob_chunk_size, reference_free=args.reference_free,
            remat=args.remat, mesh=args.mesh)
        train = load_pairs(args.dataset, args.split, args.limit)
        check_pairs(train, "train")
        evals = eval_pairs_of(args)
        if evals is not None:
            check_pairs(evals, "eval")
        if open_out_dir(args):
            return 0
        mesh = run_mesh(args)  # after jax.distributed starts: it sees every device
        if mesh is not None:
            from sparsejax import sharding  # pylint: disable=g-import-not-at-top
            sharding.check_batch("--micro-batch-size", args.micro_batch_size, mesh)
    except ValueError as e:
        fail(str(e))

    # Heavy imports after the argument and data checks, so mistakes answer at once.
    import jax  # pylint: disable=g-import-not-at-top
    from sparsejax.trainers.dpo import DPOTrainer  # pylint: disable=g-import-not-at-top
    try:
        graphdef, params, tokenizer = load_model_and_tokenizer(args, mesh)
    except ValueError as e:
        fail(str(e))
    try:
        updater = build_updater(args, sparse, params, model_name=args.model, mesh=mesh)
        trainer = DPOTrainer(graphdef, params, tokenizer, config, sparse, args.out_dir,
                             updater=updater, mesh=mesh)
    except Exception as e:  # pylint: disable=broad-except  # a mask that does not fit
        if not args.mask_path and not isinstance(e, ValueError):
            raise
        fail(f"--mask-path {args.mask_path!r}: {e}" if args.mask_path else str(e))
    try:
        trainer.encode(train[:1])  # tokenizer problems (no EOS, chat prompts) answer here
    except ValueError as e:
        fail(str(e))
    print(f"training {trainer.updater.num_trainable(params):,} of "
          f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters "
          f"({what_trains(args, sparse)}), "
          f"LR {sparse.learning_rate}, {len(train):,} pairs", file=sys.stderr)
    model_dir = os.path.join(args.out_dir, "final_model")
    final = train_with_writer(
        args, trainer.train, train, evals, resume=args.resume, progress=not args.no_progress,
        final_model_dir=model_dir, run_info={"model": args.model,
                                             "tokenizer": args.tokenizer or args.model,
                                             **adapter_run_info(args)})
    print(json.dumps(final, indent=2, default=float))
    print(f"final model: {model_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
