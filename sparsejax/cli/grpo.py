"""GRPO on any dataset and reward, with sparse (default: 1% of the weights) or full finetuning.

The data are prompts with gold answers: a built-in task (``--task gsm8k|math``), a hub
dataset (``--dataset ID`` with ``--dataset-config`` / ``--split``) or a local JSON Lines /
JSON / Parquet file (``--dataset file.jsonl``), with the question in ``--prompt-field`` (or
chat turns in ``--messages-field``) and the gold in ``--answer-field``. The reward is one or
more ``--reward`` terms, summed with weights: built-ins (gsm8k, math, exact, format) or a
function ``module:function`` / ``path.py:function`` taking ``(completions, answers)`` and,
as keyword arguments, the data's columns, ``prompts`` and ``completion_ids`` it names (all
of them with ``**kwargs``).
Defaults mirror the Multiple Ticket Hypothesis GSM8K run (``grpo_gsm8k.py`` is this
command with ``--task gsm8k``): Qwen2.5-0.5B-Instruct, 32 prompts x 16 samples, 100 steps,
a random 99%-sparse mask, LR 1e-4. Any flag can come from ``--config FILE.yaml``; the run
saves its resolved settings as ``<out-dir>/config.yaml``.

    sparsejax grpo --demo                                # ~1 minute on a CPU, offline
    sparsejax grpo --task math                           # MATH train, MATH-500 eval
    sparsejax grpo --dataset my_task.jsonl --prompt-field question \\
        --answer-field answer --reward exact --reward format=0.1
    sparsejax grpo --dataset my_task.jsonl --reward my_rewards.py:score \\
        --report-to jsonl,tensorboard
    sparsejax grpo --config runs/grpo_demo/config.yaml --out-dir runs/again

(``python experiments/grpo.py ...`` is the same command.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from sparsejax.cli import training
from sparsejax.cli.checks import check_inputs, flag
from sparsejax.cli.exits import fail, run_main
from sparsejax.cli.flags import add_flags, build, specs
from sparsejax.cli.settings import GRPODataArgs, TaskDataArgs
from sparsejax.cli.tasks import (  # noqa: F401
    DEMO_DIR,
    TASK_NAMES,
    build_reward,
    check_data_dir,
    check_reward_columns,
    data_is_local,
    data_sources,
    demo_presets,
    demo_summary,
    load_data,
    reward_specs,
    run_identity,
)
from sparsejax.config import GRPOConfig

GSM8K_DOC = """GRPO on GSM8K with sparse (default: 1% of the weights) or full finetuning.

Defaults mirror the Multiple Ticket Hypothesis GSM8K run (arXiv 2602.01599):
Qwen2.5-0.5B-Instruct, 32 prompts x 16 samples per step, 100 steps, at most 1024 new
tokens, a per-tensor random mask at 99% sparsity (seed 0), LR 1e-4; advantage =
reward - group mean, no KL; the prompt asks for the answer in \\boxed{}.
``--sparsity 0`` is full finetuning (the paper's LR 1e-6). This is ``grpo --task
gsm8k`` (one implementation): other tasks, datasets and rewards go through grpo.

    python experiments/grpo_gsm8k.py                                  # hub model + data
    python experiments/grpo_gsm8k.py --model ./Qwen2.5-0.5B-Instruct \\
        --data-dir ./gsm8k                                             # local files
"""


def build_parser(task: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``grpo`` (every data flag, ``--demo``) or of a task's own command
    (``task`` fixed; only ``--data-dir`` chooses its data)."""
    parser = training.new_parser(__doc__ if task is None else GSM8K_DOC, prog)
    training.add_model_flags(parser)
    add_flags(parser, GRPODataArgs if task is None else TaskDataArgs, "data")
    training.add_training_flags(parser, GRPOConfig, "GRPO")
    return parser


def parse_args(argv: Sequence[str] | None = None, task: str | None = None,
               prog: str | None = None) -> argparse.Namespace:
    """The parsed flags (with ``--config`` and ``--demo``), the task and the run folder
    resolved."""
    parser = build_parser(task, prog)
    args = training.parse(parser, argv, presets=demo_presets if task is None else None)
    if task is not None:  # a task's command: the data flags it has not are the task's
        for spec in specs(GRPODataArgs):
            if not hasattr(args, spec.dest):
                setattr(args, spec.dest, GRPODataArgs.__dataclass_fields__[spec.field].default)
        args.task = task
    if args.task is None and args.dataset is None:
        args.task = "gsm8k"
    if args.out_dir is None:
        args.out_dir = f"runs/grpo_{args.task}" if args.task else "runs/grpo"
    return args


def check_args(args: argparse.Namespace) -> tuple[GRPOConfig, object, object]:
    """Every flag, the model folder and the data files, before anything heavy; returns
    ``(GRPOConfig, TrainableConfig, AdapterConfig)``. Raises a one-line ValueError."""
    build(GRPODataArgs, args)
    sparse, adapter = training.common_configs(args)
    config = build(GRPOConfig, args)
    check_inputs(args, adapter=adapter)
    check_data_dir(args)
    return config, sparse, adapter


def main(argv: Sequence[str] | None = None, task: str | None = None,
         prog: str | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv, task, prog)
    from sparsejax.xla_flags import keep_optimization_barriers
    keep_optimization_barriers()  # remat saves memory on a CPU too (before JAX starts)
    try:
        config, sparse, adapter = check_args(args)
        reward = build_reward(reward_specs(args))
        data = load_data(args) if data_is_local(args) else None  # checked before the lock
        if data is not None:
            check_reward_columns(reward, data)
        if training.open_out_dir(args):
            return 0
        mesh = training.run_mesh(args)  # after jax.distributed starts: it sees every device
        if mesh is not None:
            from sparsejax.parallel import sharding
            for name in ("micro_batch_size", "prompts_per_step"):
                sharding.check_batch(flag(name), getattr(args, name), mesh)
            sharding.check_batch("--generation-batch-size", min(
                args.generation_batch_size, args.prompts_per_step * args.num_generations), mesh)
        if data is None:
            data = load_data(args)
            check_reward_columns(reward, data)
    except ValueError as e:
        fail(str(e))

    # Heavy imports after argument checks, so --help and bad flags answer at once.
    import jax
    from flax import nnx

    from sparsejax.cli.loading import load_model_and_tokenizer
    from sparsejax.data.dataset import render_prompts
    from sparsejax.trainers.grpo import GRPOTrainer
    try:
        graphdef, params, tokenizer = load_model_and_tokenizer(args, mesh)
    except ValueError as e:
        fail(str(e))

    def encode(messages):
        return [tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in render_prompts(messages, tokenizer)]

    try:
        train_ids = encode(data["train"].messages)
        test_ids = encode(data["eval"].messages) if data["eval"] is not None else None
    except ValueError as e:
        fail(str(e))
    model_config = nnx.merge(graphdef, params).config
    stop = sorted({tokenizer.eos_token_id, *model_config.eos_token_ids} - {None})
    trainer = training.build_trainer(
        lambda trainable: GRPOTrainer(graphdef, params, tokenizer, reward, config, sparse,
                                      args.out_dir, stop_token_ids=stop, trainable=trainable,
                                      mesh=mesh),
        args, params, sparse, adapter, mesh, [GRPOConfig])
    print(f"training {trainer.trainable.num_trainable(params):,} of "
          f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters "
          f"({trainer.trainable.describe()}), "
          f"LR {sparse.learning_rate}, {len(train_ids):,} prompts, reward "
          f"{' + '.join(f'{w:g} * {n}' for n, _, w in reward.components)}", file=sys.stderr)
    model_dir = os.path.join(args.out_dir, "final_model")
    final = training.train_with_writer(
        args, trainer.train, train_ids, data["train"].answers, eval_prompt_ids=test_ids,
        eval_answers=data["eval"].answers if data["eval"] else None,
        columns=data["train"].columns,
        eval_columns=data["eval"].columns if data["eval"] else None, resume=args.resume,
        progress=args.progress, final_model_dir=model_dir,
        run_info=run_identity(args, reward, training.adapter_run_info(adapter)))
    print(json.dumps({k: v for k, v in final.items() if k != "eval_samples"}, indent=2))
    print(f"final model: {model_dir}", file=sys.stderr)
    if args.demo and os.path.realpath(args.model) == os.path.realpath(DEMO_DIR):
        print(demo_summary(args.out_dir, time.perf_counter() - t_start), file=sys.stderr)
    return 0


def gsm8k_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``grpo_gsm8k``: :func:`main` with the GSM8K task fixed."""
    return main(argv, task="gsm8k", prog=prog)


def cli(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Runs ``grpo`` and exits with its status (:func:`sparsejax.cli.exits.run_main`)."""
    run_main(lambda: main(argv, prog=prog))


def gsm8k_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    run_main(lambda: gsm8k_main(argv, prog=prog))
