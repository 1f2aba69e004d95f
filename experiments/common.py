"""Pieces the experiment scripts share: argument groups, checks, model loading, errors.

Scripts import this as ``from common import ...`` (it sits beside them). Nothing here
imports jax or sparsejax at import time, so ``--help`` and bad flags answer at once:
every flag, the model folder and the data files are checked before anything heavy
is imported or loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from sparsejax.trainers.config import SparseConfig


def fail(message: str, code: int = 2) -> NoReturn:
    """Exits with status ``code`` (2: bad input) and a one-line message (no traceback)."""
    print(f"error: {str(message).strip().splitlines()[0] if str(message).strip() else message}",
          file=sys.stderr, flush=True)
    sys.exit(code)


# ---------------------------------------------------------------------- flag checks


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_number(args: argparse.Namespace, name: str, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Raises ValueError naming the flag unless ``args.<name>`` (if set) is finite and
    in the range (``low``/``high`` inclusive unless ``*_open``)."""
    value = getattr(args, name)
    if value is None:
        return
    bounds = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", "
              + ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None
                                                            else "]"))
    bad = not math.isfinite(value)
    bad = bad or (low is not None and (value < low or (low_open and value == low)))
    bad = bad or (high is not None and (value > high or (high_open and value == high)))
    if bad and isinstance(value, int) and high is None and not low_open:
        raise ValueError(f"{flag(name)} must be >= {low:g}, got {value}")
    if bad:
        raise ValueError(f"{flag(name)} must be a finite number in {bounds}, got {value}")


def check_numbers(args: argparse.Namespace, rules: dict[str, tuple]) -> None:
    """``rules``: flag attribute -> ``(low, high)`` or ``(low, high, low_open, high_open)``."""
    for name, rule in rules.items():
        low, high, *open_ = rule
        check_number(args, name, low=low, high=high,
                     low_open=bool(open_ and open_[0]),
                     high_open=bool(len(open_) > 1 and open_[1]))


def check_out_dir_path(path: str, name: str = "--out-dir") -> None:
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise ValueError(f"{name} {path!r}: {probe} is a file, not a folder")


def check_safetensors(path: str) -> None:
    """Raises ValueError naming ``path`` unless it is a whole safetensors file (header
    readable, file as long as the header says)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000 or 8 + n > size:
                raise ValueError(f"is truncated ({size} bytes; the header alone needs "
                                 f"{8 + n})" if n <= 100_000_000 else "has no valid header")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    except ValueError as e:
        raise ValueError(f"{path} {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (unreadable header)")
    end = max((t["data_offsets"][1] for k, t in header.items()
               if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t),
              default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated ({size} of {8 + n + end} bytes)")


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name))


MODEL_TYPES = ("llama", "qwen2")  # sparsejax.models.config.SUPPORTED_MODEL_TYPES
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")


def check_model_folder(args: argparse.Namespace) -> None:
    """Local ``--model`` / ``--tokenizer`` folders: config.json is valid JSON, the
    safetensors files are whole, tokenizer files exist. Hub ids are not checked here."""
    model = os.path.expanduser(args.model)
    if looks_local(args.model):
        if not os.path.isdir(model):
            raise ValueError(f"--model {args.model!r}: no such folder")
        config = os.path.join(model, "config.json")
        if not os.path.isfile(config):
            raise ValueError(f"--model {args.model!r}: {config} is missing")
        try:
            with open(config, encoding="utf-8") as f:
                parsed = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config} is not valid JSON ({e})") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{config} is not a JSON object")
        if parsed.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"{config}: model_type {parsed.get('model_type')!r} is not "
                             f"supported; expected one of {MODEL_TYPES}")
        weights = sorted(n for n in os.listdir(model) if n.endswith(".safetensors"))
        if not weights:
            raise ValueError(f"--model {args.model!r}: no *.safetensors weights in {model}")
        for name in weights:
            check_safetensors(os.path.join(model, name))
    tok_name = args.tokenizer or args.model
    what = "--tokenizer" if args.tokenizer else "--model"
    tok = os.path.expanduser(tok_name)
    if looks_local(tok_name):
        if not os.path.isdir(tok):
            raise ValueError(f"{what} {tok_name!r}: no such folder (for the tokenizer)")
        if not any(os.path.isfile(os.path.join(tok, n)) for n in TOKENIZER_FILES):
            raise ValueError(f"{what} {tok_name!r}: no tokenizer files in {tok} (need one of "
                             f"{', '.join(TOKENIZER_FILES)})"
                             + ("" if args.tokenizer else "; pass --tokenizer"))


def check_jsonl(path: str, *, required: tuple[str, ...] = ()) -> int:
    """Checks a JSON Lines data file; returns its number of records.

    Raises:
        ValueError: naming the file and line of a line that is not a JSON object (or
            lacks a ``required`` field), or naming the file if it has no records.
    """
    count = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: not a JSON object "
                                 f"(a {type(row).__name__})")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{number}: lacks {', '.join(map(repr, missing))}")
            count += 1
    if not count:
        raise ValueError(f"{path} has no records")
    return count


def check_mask_file(path: str | None) -> None:
    if path is None:
        return
    if not os.path.isfile(path):
        raise ValueError(f"--mask-path {path!r} is not a file")
    try:
        check_safetensors(path)
    except ValueError as e:
        raise ValueError(f"--mask-path: {e}") from None


def check_run_args(args: argparse.Namespace) -> None:
    """The checks every training script shares (mask, optimizer, run flags)."""
    check_numbers(args, {"sparsity": (0.0, 1.0, False, True), "lr": (0.0, None, True),
                         "weight_decay": (0.0, None), "max_grad_norm": (None, None)})
    for name in ("warmup_steps", "save_every", "seed", "mask_seed"):
        check_number(args, name, low=0)
    check_out_dir_path(args.out_dir)
    check_mask_file(args.mask_path)
    if args.resume and getattr(args, "overwrite", False):
        raise ValueError("--resume and --overwrite exclude each other")
    check_report_to_flag(args)
    check_distributed_args(args)


def check_report_to_flag(args: argparse.Namespace) -> tuple[str, ...]:
    """The writer names of ``--report-to`` (known names, their packages installed)."""
    from sparsejax.metric_writers import check_report_to  # pylint: disable=g-import-not-at-top
    return check_report_to(args.report_to)


def open_writer(args: argparse.Namespace, out_dir: str | None = None,
                jsonl: bool = False) -> Any:
    """The writers of ``--report-to`` under ``out_dir`` (default ``--out-dir``), or None.

    ``jsonl`` in ``--report-to`` is the trainers' own ``metrics.jsonl`` (always written),
    so it opens no writer unless ``jsonl=True`` (a script without a trainer log). W&B
    gets the run's folder name as its name and the flags as its config. The caller
    closes the writer (after the run, also when it stops).
    """
    names = [n for n in check_report_to_flag(args) if jsonl or n != "jsonl"]
    if not names:
        return None
    from sparsejax.metric_writers import create_writer  # pylint: disable=g-import-not-at-top
    out_dir = args.out_dir if out_dir is None else out_dir
    config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list,
                                                                      type(None)))}
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


def add_model_args(parser: argparse.ArgumentParser, default_model: str) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="Hugging Face hub id or local folder (config.json + safetensors)")
    group.add_argument("--tokenizer", default=None,
                       help="tokenizer hub id or folder (default: the model's)")
    group.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                       help="parameter dtype")
    group.add_argument("--remat", default="layer", choices=["none", "layer", "dots"],
                       help="what the backward pass recomputes: layer keeps only each layer's "
                       "input (least memory), dots also the matmul outputs, none keeps all")


def add_sparse_args(parser: argparse.ArgumentParser, *, default_lr: float | None) -> None:
    group = parser.add_argument_group("mask and optimizer")
    group.add_argument("--sparsity", type=float, default=0.99,
                       help="fraction of weights frozen; 0 = full finetuning (dense AdamW)")
    group.add_argument("--mask-seed", type=int, default=0, help="seed of the random mask")
    group.add_argument("--mask-strategy", default="auto",
                       choices=["auto", "per_tensor", "global", "row_balanced"],
                       help="auto: row_balanced with --mesh (the step stays on each "
                            "device's rows), per_tensor without")
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
    group.add_argument("--sparse-grads", default="auto", choices=["auto", "on", "off"],
                       help="sparse runs: weight gradients only at the active entries "
                       "(auto: on where bench_train_step.py measured it faster: up to 10%% "
                       "density on CPU with the C++ kernel, 1%% otherwise)")


def add_run_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--out-dir", default=default_out,
                       help="metrics.jsonl, checkpoints/, curves.png, final_eval.json, final_model/")
    group.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    group.add_argument("--resume", action="store_true",
                       help="continue from the newest intact checkpoint in --out-dir (a "
                            "finished run: nothing to do)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace an earlier run's outputs in --out-dir")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_report_to_arg(group)
    add_distributed_args(parser)
    parser.add_argument_group("many devices").add_argument(
        "--mesh", default="",
        help="devices of the run: data=D,fsdp=F (D x F = all devices), auto (every "
             "device on fsdp) or empty (one device); see sparsejax.sharding")


def run_mesh(args: argparse.Namespace) -> Any:
    """The run's :class:`jax.sharding.Mesh` from ``--mesh`` (None without); call after
    :func:`open_out_dir` (which starts ``jax.distributed``). Raises a one-line ValueError
    naming the mesh when it does not fit the devices."""
    from sparsejax import sharding  # pylint: disable=g-import-not-at-top
    try:
        return sharding.as_mesh(getattr(args, "mesh", ""))
    except ValueError as e:
        raise ValueError(f"--mesh: {e}") from None


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """``--coordinator-address`` / ``--num-processes`` / ``--process-id`` (or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables;
    SLURM and Open MPI launches are detected): see :mod:`sparsejax.distributed`."""
    group = parser.add_argument_group("many processes (hosts)")
    group.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="process 0's address for jax.distributed (default "
                            "$JAX_COORDINATOR_ADDRESS; unset: one process)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="processes of the run (default $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's index, 0 writes the run's outputs "
                            "(default $JAX_PROCESS_ID)")


def check_distributed_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the flag for bad or incomplete launch settings."""
    from sparsejax.distributed import launch_settings  # pylint: disable=g-import-not-at-top
    launch_settings(getattr(args, "coordinator_address", None),
                    getattr(args, "num_processes", None), getattr(args, "process_id", None))


def start_distributed(args: argparse.Namespace) -> None:
    """Starts ``jax.distributed`` when the run is launched as several processes (before
    any JAX computation); a no-op for one process."""
    from sparsejax import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(getattr(args, "coordinator_address", None),
                           getattr(args, "num_processes", None),
                           getattr(args, "process_id", None))


def add_report_to_arg(group: Any) -> None:
    group.add_argument("--report-to", default="jsonl", metavar="WRITERS",
                       help="where metrics go, comma-separated: jsonl (<out-dir>/"
                            "metrics.jsonl, always written), tensorboard (<out-dir>/"
                            "tensorboard/), wandb (needs the wandb package), none")


def open_out_dir(args: argparse.Namespace) -> bool:
    """Starts ``jax.distributed`` for a many-process launch (:func:`start_distributed`),
    locks ``--out-dir`` for this process and checks what it holds, before any heavy
    work. Returns True when ``--resume`` finds the run finished (nothing to do).

    Raises:
        ValueError: a new run over an earlier run's outputs without --overwrite.
        sparsejax.run_dir.RunError: another run holds the folder.
    """
    from sparsejax import run_dir  # pylint: disable=g-import-not-at-top
    from sparsejax.trainers import signals  # pylint: disable=g-import-not-at-top
    start_distributed(args)  # before the lock: its name has the process index
    signals.install()
    run_dir.lock(args.out_dir)
    if not args.resume:
        run_dir.refuse_earlier_run(args.out_dir, overwrite=getattr(args, "overwrite", False))
        return False
    done = run_dir.finished_step(args.out_dir)
    if done is not None and done >= args.steps:
        print(f"{args.out_dir}: the run is finished (step {done}); nothing to do",
              file=sys.stderr)
        return True
    return False


def sparse_config(args: argparse.Namespace) -> SparseConfig:
    """The :class:`SparseConfig` of the parsed arguments (raises ValueError if bad)."""
    from sparsejax.trainers.config import SparseConfig  # pylint: disable=g-import-not-at-top
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
        backend=args.backend, sparse_grads=args.sparse_grads)


def load_model_and_tokenizer(args: argparse.Namespace, mesh: Any = None
                             ) -> tuple[Any, Any, Any]:
    """``(graphdef, params, tokenizer)`` from ``--model`` / ``--tokenizer`` / ``--dtype``;
    with a ``mesh`` every param is read straight into its shards (the rule table of
    :mod:`sparsejax.sharding`).

    Raises ValueError with a one-line message naming the model or the tokenizer.
    """
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    from sparsejax.models import load_hf  # pylint: disable=g-import-not-at-top

    def first_line(e: BaseException) -> str:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]

    try:
        from sparsejax.sharding import hf_param_shardings  # pylint: disable=g-import-not-at-top
        model = load_hf(args.model, param_dtype=args.dtype, sharding=hf_param_shardings(
            args.model, mesh, param_dtype=args.dtype))
    except Exception as e:  # pylint: disable=broad-except  # any unusable model: one line
        raise ValueError(f"cannot load model {args.model!r}: {first_line(e)}") from e
    name = args.tokenizer or args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"cannot load tokenizer {name!r}"
                         f"{' (--tokenizer)' if args.tokenizer else ''}: {first_line(e)}"
                         ) from e
    if tokenizer.eos_token_id is None and len(tokenizer) == 0:
        raise ValueError(f"tokenizer {name!r} is empty")
    graphdef, params = nnx.split(model)
    return graphdef, params, tokenizer


def run_main(main: Callable[[], int]) -> None:
    """Runs a script's ``main`` and exits: 0 done, 1 a run error (disk full, lock held,
    no intact checkpoint: one line), 2 bad input, 130/143 SIGINT/SIGTERM ("interrupted
    at step N; resume with --resume"). After a stop or a run error the process exits
    at once (``os._exit``), so no background writer thread prints on the way out.
    Imports nothing heavy itself (:func:`open_out_dir` installs the signal handlers)."""
    try:
        code = main()
    except KeyboardInterrupt as e:  # also sparsejax.trainers.signals.Interrupted
        code = getattr(e, "exit_code", 130)
        print(e.message() if hasattr(e, "message") else "interrupted; resume with --resume",
              file=sys.stderr)
    except Exception as e:  # pylint: disable=broad-except
        run_dir = sys.modules.get("sparsejax.run_dir")
        if run_dir is None or not isinstance(e, run_dir.RunError):
            raise
        code = 1
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    else:
        # The run is done (its outputs are on disk): a signal during the interpreter's
        # shutdown must not turn a finished run into a failed one.
        import signal  # pylint: disable=g-import-not-at-top
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def what_trains(args: argparse.Namespace, sparse: SparseConfig) -> str:
    """A few words on what a run trains, for its first line."""
    if getattr(args, "adapter", "none") != "none":
        return f"{args.adapter} adapter, rank {args.lora_rank}, frozen base"
    return "full finetuning" if sparse.dense else f"sparsity {sparse.sparsity}"


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
