"""What the training commands (``grpo``, ``dpo``) share: their parser's common flags, the
run folder's opening (lock, earlier outputs, ``config.yaml``), the mesh, what trains and
the metric writers.

The module imports no jax at import time; the functions that need it import it when
called (after every flag and file has been checked).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sparsejax.cli import config_file
from sparsejax.cli.exits import fail
from sparsejax.cli.flags import add_flags, build, flag_message
from sparsejax.cli.settings import ModelArgs, OutputArgs, ProcessArgs
from sparsejax.config import AdapterConfig, RunConfig, TrainableConfig

RUN_GROUP = "run: loop, evaluation, checkpoints, devices"


def new_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose description is the first paragraph of ``doc``, the rest its epilog,
    with ``--config``."""
    head, _, rest = doc.partition("\n\n")
    parser = argparse.ArgumentParser(prog=prog, description=head, epilog=rest or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config_file.add_config_flag(parser)
    return parser


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, ModelArgs, "model")


def add_training_flags(parser: argparse.ArgumentParser, job: type, title: str) -> None:
    """The flags of a job's config (``job``: GRPOConfig, DPOConfig; the fields it shares
    with every run in their own group), what trains, the output and the processes."""
    add_flags(parser, job, title, groups={RunConfig: RUN_GROUP})
    add_flags(parser, TrainableConfig, "mask and optimizer")
    add_flags(parser, AdapterConfig, "adapter (LoRA / Partial-LoRA)")
    add_flags(parser, OutputArgs, "output")
    add_flags(parser, ProcessArgs, "many processes (hosts)")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *,
          presets: Callable[[argparse.Namespace], dict[str, Any] | None] | None = None
          ) -> argparse.Namespace:
    """The flags, with ``--config`` (:func:`sparsejax.cli.config_file.parse`)."""
    return config_file.parse(parser, argv, presets=presets)


def common_configs(args: argparse.Namespace) -> tuple[TrainableConfig, AdapterConfig]:
    """The checked command-line settings every run shares (model, output, processes),
    and its :class:`TrainableConfig` and :class:`AdapterConfig` (ValueErrors name flags)."""
    build(ModelArgs, args)
    build(OutputArgs, args)
    build(ProcessArgs, args)
    return build(TrainableConfig, args), build(AdapterConfig, args)


def open_out_dir(args: argparse.Namespace) -> bool:
    """Starts ``jax.distributed`` for a many-process launch, locks ``--out-dir`` for this
    process and checks what it holds, before any heavy work; then process 0 saves the
    resolved settings as ``<out-dir>/config.yaml``. Returns True when ``--resume`` finds
    the run finished (nothing to do, nothing written).

    Raises:
        ValueError: a new run over an earlier run's outputs without --overwrite.
        sparsejax.runs.run_dir.RunError: another run holds the folder.
    """
    from sparsejax.parallel import distributed
    from sparsejax.runs import run_dir, signals
    start_distributed(args)  # before the lock: its name has the process index
    signals.install()
    run_dir.lock(args.out_dir)
    if not args.resume:
        run_dir.refuse_earlier_run(args.out_dir, overwrite=getattr(args, "overwrite", False))
    else:
        done = run_dir.finished_step(args.out_dir)
        if done is not None and done >= args.steps:
            print(f"{args.out_dir}: the run is finished (step {done}); nothing to do",
                  file=sys.stderr)
            return True
    if distributed.is_main():
        config_file.save(args, args.out_dir)
    return False


def start_distributed(args: argparse.Namespace) -> None:
    """Starts ``jax.distributed`` when the run is launched as several processes (before
    any JAX computation); a no-op for one process."""
    from sparsejax.parallel import distributed
    distributed.initialize(getattr(args, "coordinator_address", None),
                           getattr(args, "num_processes", None),
                           getattr(args, "process_id", None))


def run_mesh(args: argparse.Namespace) -> Any:
    """The run's :class:`jax.sharding.Mesh` from ``--mesh`` (None without); call after
    :func:`open_out_dir` (which starts ``jax.distributed``). Raises a one-line ValueError
    naming the mesh when it does not fit the devices."""
    from sparsejax.parallel import sharding
    try:
        return sharding.as_mesh(getattr(args, "mesh", ""))
    except ValueError as e:
        raise ValueError(f"--mesh: {e}") from None


def build_trainer(make: Callable[..., Any], args: argparse.Namespace, params: Any,
                  sparse: TrainableConfig, adapter: AdapterConfig, mesh: Any,
                  configs: Sequence[type]) -> Any:
    """``make(trainable=...)``: the trainer, given what trains
    (:func:`sparsejax.trainable.build_trainable` of the mask or adapter settings, laid
    out on ``mesh``). A setting that does not fit the model (a mask, a ratios file,
    adapter targets, a batch on the mesh) exits with one line naming its flag."""
    from sparsejax.trainable import build_trainable
    try:
        trainable = build_trainable(sparse, params, adapter=adapter, mesh=mesh,
                                    model_name=args.model, total_steps=args.steps)
        return make(trainable=trainable)
    except Exception as e:  # a mask that does not fit
        if not args.mask_path and not isinstance(e, ValueError):
            raise
        message = flag_message(str(e), [*configs, TrainableConfig, AdapterConfig])
        fail(f"--mask-path {args.mask_path!r}: {e}" if args.mask_path else message)


def adapter_run_info(adapter: AdapterConfig) -> dict[str, Any]:
    """The adapter settings for the run's identity (a resume must not change them)."""
    if adapter.kind == "none":
        return {}
    return {"adapter": adapter.kind, "lora_rank": adapter.lora_rank,
            "lora_alpha": adapter.lora_alpha, "lora_rslora": adapter.lora_rslora,
            "lora_targets": adapter.lora_targets, "lora_density": adapter.lora_density,
            "lora_ratios": None if adapter.lora_ratios is None
            else os.path.abspath(adapter.lora_ratios), "lora_seed": adapter.lora_seed}


def open_writer(args: argparse.Namespace, out_dir: str | None = None,
                jsonl: bool = False) -> Any:
    """The writers of ``--report-to`` under ``out_dir`` (default ``--out-dir``), or None.

    ``jsonl`` in ``--report-to`` is the trainers' own ``metrics.jsonl`` (always written),
    so it opens no writer unless ``jsonl=True`` (a script without a trainer log). W&B
    gets the run's folder name as its name and the resolved settings as its config. The
    caller closes the writer (after the run, also when it stops).
    """
    from sparsejax.cli.checks import check_report_to_flag
    names = [n for n in check_report_to_flag(args) if jsonl or n != "jsonl"]
    if not names:
        return None
    from sparsejax.runs.metric_writers import create_writer
    out_dir = args.out_dir if out_dir is None else out_dir
    config = {k: v for k, v in config_file.settings(args).items()
              if isinstance(v, (str, int, float, bool, list, type(None)))}
    return LazyWriter(lambda: create_writer(names, out_dir, config=config,
                                            run_name=os.path.basename(os.path.abspath(out_dir))))


class LazyWriter:
    """A metric writer opened at its first record: after the trainer has checked the run's
    folder (a new run refuses a folder with an earlier run's ``tensorboard/``), and not at
    all for a run that stops before its first step."""

    def __init__(self, open_fn: Callable[[], Any]):
        self._open, self._writer = open_fn, None

    def write_scalars(self, step: int, scalars: Any) -> None:
        if self._writer is None:
            self._writer = self._open()
        self._writer.write_scalars(step, scalars)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def train_with_writer(args: argparse.Namespace, train: Any, *train_args: Any,
                      **train_kwargs: Any) -> Any:
    """``train(*train_args, writer=..., **train_kwargs)`` with the ``--report-to`` writer
    open (closed after, also on a stop); a ``ValueError`` of the run (a resume with changed
    settings, ``--steps`` below the checkpoint) exits with its one line."""
    try:
        writer = open_writer(args)  # tensorboard/wandb; metrics.jsonl is always written
    except ValueError as e:
        fail(str(e))
    try:
        return train(*train_args, writer=writer, **train_kwargs)
    except ValueError as e:
        fail(str(e))
    finally:
        if writer is not None:
            writer.close()


def check_offline_args(args: argparse.Namespace, data_type: type, config_type: type
                       ) -> tuple[Any, TrainableConfig, AdapterConfig]:
    """Every flag of an offline job (DPO, KTO) and the model folder, before anything heavy:
    ``(config_type(...), TrainableConfig, AdapterConfig)``. Raises a one-line ValueError."""
    from sparsejax.cli.checks import check_inputs
    build(data_type, args)
    sparse, adapter = common_configs(args)
    config = build(config_type, args)
    check_inputs(args, adapter=adapter)
    return config, sparse, adapter


def run_offline_job(args: argparse.Namespace, trainer_type: type, config: RunConfig,
                    sparse: TrainableConfig, adapter: AdapterConfig, mesh: Any,
                    train: Sequence[Any], evals: Sequence[Any] | None, noun: str) -> int:
    """The rest of an offline job (DPO, KTO) once its flags and data are checked: loads the
    model, builds ``trainer_type(graphdef, params, tokenizer, config, sparse, out_dir,
    trainable=, mesh=)``, trains on ``train`` (``noun``: what a row is, for the summary
    line), prints the final evaluation; returns the exit status."""
    import json

    import jax

    from sparsejax.cli.loading import load_model_and_tokenizer
    try:
        graphdef, params, tokenizer = load_model_and_tokenizer(args, mesh)
    except ValueError as e:
        fail(str(e))
    trainer = build_trainer(
        lambda trainable: trainer_type(graphdef, params, tokenizer, config, sparse,
                                       args.out_dir, trainable=trainable, mesh=mesh),
        args, params, sparse, adapter, mesh, [type(config)])
    try:
        trainer.encode(train[:1])  # tokenizer problems (no EOS, chat prompts) answer here
    except ValueError as e:
        fail(str(e))
    print(f"training {trainer.trainable.num_trainable(params):,} of "
          f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters "
          f"({trainer.trainable.describe()}), "
          f"LR {sparse.learning_rate}, {len(train):,} {noun}", file=sys.stderr)
    model_dir = os.path.join(args.out_dir, "final_model")
    final = train_with_writer(
        args, trainer.train, train, evals, resume=args.resume, progress=args.progress,
        final_model_dir=model_dir, run_info={"model": args.model,
                                             "tokenizer": args.tokenizer or args.model,
                                             **adapter_run_info(adapter)})
    print(json.dumps(final, indent=2, default=float))
    print(f"final model: {model_dir}", file=sys.stderr)
    return 0
