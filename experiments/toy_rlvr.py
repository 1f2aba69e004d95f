"""The papers' findings at toy scale on CPU: sparse vs full GRPO on synthetic addition.

Nothing is downloaded. A tiny Qwen2-architecture decoder is trained from scratch
with supervised steps on ``"a+b="`` -> ``"a+b"`` (:mod:`sparsejax.data.toy_task`) until
it is right part of the time, then finetuned with GRPO (reward 1 iff the answer is
exactly right) in several ways, and the script measures:

  (a) random 99% sparse vs full finetuning: final accuracy difference;
  (b) pairwise Jaccard of the 99% masks vs chance ``p / (2 - p)``; do all of them work;
  (c) where accuracy collapses as sparsity grows (99% .. 99.999%, per-tensor masks,
      plus a global draw of the same budget where per-tensor leaves nothing);
  (d) the full run's update sparsity (bf16, ``|delta| <= 1e-5``) per layer and per
      matrix type, and its mean update rank (Mukherjee et al.);
  (e) masks predicted from the first 10% of the full run (magnitude, momentum,
      variance scores, exact top-k) vs the final update: Jaccard by sparsity
      (BSR-AdamW Table 2), against the random baseline;
  (f) subnetwork finetuning on the full run's diff mask: accuracy and the share of
      parameters equal to the full run's;
  (g) policy gradient on the top-20% entropy tokens vs all tokens (full finetuning);
  (h) LoRA, masked LoRA at a fixed density, Partial-LoRA (per-kernel ratios derived on
      the SFT base with the task's accuracy on a few-shot split) and Targeted-LoRA,
      beside full FT and the 99% random mask, over several seeds (arXiv 2512.22495).

Outputs in ``--out-dir``: ``results.md`` (tables and one-line verdicts),
``results.json`` (every number, curves included), ``accuracy_vs_step.png`` and
``accuracy_vs_trainable.png``, ``lora_ratios.json`` (the derived ratios, a
``--lora-ratios FILE`` for the trainers), and the curves through ``--report-to`` (default
``metrics.jsonl``; ``tensorboard``, ``wandb``). The same command gives the same numbers.

Modules: this file (flags, presets, which sections run), ``toy_runs.py`` (the task,
the SFT base, one GRPO run), ``toy_sparse.py`` ((a)-(g)), ``toy_lora.py`` ((h)),
``toy_report.py`` (verdicts, ``results.md``, plots).

    python experiments/toy_rlvr.py              # the default run (~8-10 min, 2 CPU cores) -> runs/toy_rlvr/
    python experiments/toy_rlvr.py --sections lora --steps 60 --lora-seeds 3 \\
        --out-dir experiments/results/toy_rlvr_lora   # the committed LoRA table (h only)
    python experiments/toy_rlvr.py --quick --out-dir /tmp/toy   # CI smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
from typing import Any

from sparsejax.cli.checks import check_number, check_out_dir_path, check_report_to_flag
from sparsejax.cli.exits import fail

SECTIONS = ("all", "sparse", "lora")
# LoRA arms (h): one LR for dense, masked, Partial- and Targeted-LoRA. Chosen by a 60-step
# sweep on the default preset (seed 0): LoRA 1e-3 (64.1%) > 3e-3 (56.0%) >> 1e-2 (0%,
# collapses) > 3e-2 (0%); Partial-LoRA 1e-3 (64.8%) ~ 3e-3 (64.3%) >> 1e-2 (15%) > 3e-2.
LORA_LEARNING_RATE = 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true",
                        help="tiny CI configuration (< 2 minutes); writes to "
                             "runs/toy_rlvr_quick/ unless --out-dir is given")
    parser.add_argument("--out-dir", default=None,
                        help="results folder (default runs/toy_rlvr/; the committed results "
                             "are in experiments/results/toy_rlvr/)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data splits, model init, SFT and GRPO sampling")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per run")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply every learning rate (for a sweep)")
    parser.add_argument("--sections", default="all", choices=SECTIONS,
                        help="all: (a)-(h); sparse: (a)-(g); lora: (h) only (the LoRA "
                             "arms beside full FT and the 99%% mask)")
    parser.add_argument("--lora-lr", type=float, default=None,
                        help=f"learning rate of the LoRA arms (default {LORA_LEARNING_RATE:g}, "
                             "times --lr-scale)")
    parser.add_argument("--lora-seeds", type=int, default=None, metavar="N",
                        help="seeds of section (h) (default 3; --quick 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--report-to", default="jsonl", metavar="WRITERS",
                        help="where the per-step curves go, comma-separated: jsonl "
                             "(<out-dir>/metrics.jsonl), tensorboard (<out-dir>/tensorboard/), "
                             "wandb, none; tags are <run>/reward_mean, <run>/accuracy, sft/...")
    args = parser.parse_args(argv)
    try:
        check_number(args, "steps", low=1)
        check_number(args, "seed", low=0)
        check_number(args, "lr_scale", low=0.0, low_open=True)
        check_number(args, "lora_lr", low=0.0, low_open=True)
        check_number(args, "lora_seeds", low=1)
        if args.out_dir is not None:
            check_out_dir_path(args.out_dir)
        check_report_to_flag(args)
    except ValueError as e:
        fail(str(e))
    return args


if __name__ == "__main__":
    parse_args()  # --help and bad flags answer before jax is imported


import jax  # noqa: E402
from toy_lora import run_lora_section  # noqa: E402
from toy_report import plot, verdicts, write_markdown  # noqa: E402
from toy_runs import Experiment, RunResult, sparsity_name  # noqa: E402
from toy_sparse import planned_runs, run_sparse_sections  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sparsejax.data import toy_task as tt  # noqa: E402
from sparsejax.runs import provenance  # noqa: E402
from sparsejax.runs.reporting import to_python  # noqa: E402

# Learning rate per sparsity. The Multiple Ticket paper uses 1e-6 for full finetuning
# and 1e-4 at 99% up to 1e-2 at 99.999% (Qwen2.5, GSM8K). We keep the monotone trend:
# full FT lowest (30x below 99%), then x3 per decade of sparsity. Chosen by a short
# 60-step sweep on the default preset: full FT 1e-4 > 3e-4 >> 1e-3 (collapses to ~9%)
# >> 3e-3 (0%); 99%: 3e-3 ~ 1e-2 > 3e-2; 99.9%: 1e-2 ~ 3e-2 > 1e-1.
LEARNING_RATES = {0.0: 1e-4, 0.99: 3e-3, 0.999: 1e-2, 0.9999: 3e-2, 0.99999: 1e-1}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one configuration of the experiment."""

    digits: int
    hidden_size: int
    num_layers: int
    sft: tt.SFTConfig
    sft_dev: int  # held-out problems that decide when SFT stops
    test: int  # held-out problems every reported accuracy is measured on
    train_prompts: int  # GRPO prompt pool
    steps: int
    prompts_per_step: int
    num_generations: int
    eval_points: int  # evaluations along each run (besides step 0 and the end)
    mask_seeds: tuple[int, ...]
    sparsities: tuple[float, ...]
    predict_sparsities: tuple[float, ...]
    works_within: float  # (b): a mask "works" if its accuracy is within this of full FT
    # (h) LoRA arms: adapter shape, masked-LoRA density, ratio derivation, seeds.
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    lora_density: float = 0.25
    lora_fewshot: int = 128  # few-shot problems the ratios are derived on
    lora_threshold: float = 0.9
    lora_ratio_step: float = 0.1
    lora_max_sparsity: float = 0.9
    lora_svd_rank: int = 8
    lora_seeds: tuple[int, ...] = (0, 1, 2)


DEFAULT = Preset(
    digits=2, hidden_size=64, num_layers=2,
    sft=tt.SFTConfig(max_steps=3000, batch_size=128, learning_rate=3e-3, warmup_steps=100,
                     eval_every=50, band_low=0.3, band_high=0.7),
    sft_dev=256, test=1024, train_prompts=1024, steps=100, prompts_per_step=16,
    num_generations=8, eval_points=9, mask_seeds=(0, 1, 2, 3, 4),
    sparsities=(0.99, 0.999, 0.9999, 0.99999), predict_sparsities=(0.9, 0.99, 0.999),
    works_within=0.05)

QUICK = Preset(
    digits=2, hidden_size=32, num_layers=1,
    sft=tt.SFTConfig(max_steps=150, batch_size=64, learning_rate=1e-2, warmup_steps=20,
                     eval_every=50, band_low=0.3, band_high=0.7),
    sft_dev=64, test=64, train_prompts=64, steps=10, prompts_per_step=4,
    num_generations=4, eval_points=1, mask_seeds=(0, 1), sparsities=(0.99, 0.999),
    predict_sparsities=(0.9, 0.99), works_within=0.05, lora_rank=4, lora_fewshot=64,
    lora_svd_rank=4, lora_seeds=(0,))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    if args.steps is not None:
        preset = dataclasses.replace(preset, steps=args.steps)
    if args.lora_seeds is not None:
        preset = dataclasses.replace(preset, lora_seeds=tuple(range(args.lora_seeds)))
    out_dir = args.out_dir or os.path.join("runs", "toy_rlvr_quick" if args.quick else "toy_rlvr")
    os.makedirs(out_dir, exist_ok=True)
    # One run per folder at a time; Ctrl-C / SIGTERM stop it with one line. The run keeps
    # no checkpoints (it is a few minutes and deterministic: rerun it), and its result
    # files are each written whole, so a stop leaves the previous results or the new ones.
    from sparsejax.runs import run_dir, signals
    signals.install()
    run_dir.lock(out_dir)
    progress = not args.no_progress
    lrs = {k: v * args.lr_scale for k, v in LEARNING_RATES.items()}
    lora_lr = (LORA_LEARNING_RATE if args.lora_lr is None else args.lora_lr) * args.lr_scale
    sparse_on, lora_on = args.sections in ("all", "sparse"), args.sections in ("all", "lora")
    t_start = time.perf_counter()

    from sparsejax.runs.metric_writers import create_writer
    stale = os.path.join(out_dir, "metrics.jsonl")  # the writer appends: start afresh
    if os.path.exists(stale):
        os.remove(stale)
    with tempfile.TemporaryDirectory() as workdir, create_writer(
            args.report_to, out_dir, run_name=os.path.basename(out_dir),
            config={k: v for k, v in vars(args).items()}) as writer:
        exp = Experiment(preset, args.seed, progress, workdir)
        exp.writer = writer
        exp.run_sft()
        runs: dict[str, RunResult] = {}
        plan = (planned_runs(preset) if sparse_on else 0) + (
            6 * len(preset.lora_seeds) - (2 if sparse_on else 0) if lora_on else 0)
        outer = tqdm(total=plan, desc="runs", disable=not progress)

        def done(r: RunResult) -> None:
            runs[r.name] = r
            outer.update(1)
            outer.write(f"{r.name}: trainable {r.trainable:,}, lr {r.learning_rate:g}, "
                        f"accuracy {100 * r.final_accuracy:.1f}% ({r.seconds:.0f} s)")

        def extra_run() -> None:
            outer.total += 1
            outer.refresh()

        m: dict[str, Any] = {}
        if sparse_on:
            m.update(run_sparse_sections(exp, lrs, runs, done, extra_run))
        if lora_on:
            m["h"] = run_lora_section(exp, lrs, lora_lr, runs, done,
                                      os.path.join(out_dir, "lora_ratios.json"),
                                      progress=progress)
        outer.close()

    command = "python experiments/toy_rlvr.py" + (" " + " ".join(sys.argv[1:])
                                                  if argv is None and sys.argv[1:] else "")
    import flax
    res = {
        "command": command if argv is None else "toy_rlvr.main(" + repr(argv) + ")",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": provenance.git_commit(),
        "device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores)",
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": flax.__version__},
        "config": {**{k: v for k, v in dataclasses.asdict(preset).items() if k != "sft"},
                   "sft": dataclasses.asdict(preset.sft), "seed": args.seed,
                   "sections": args.sections,
                   "learning_rates": {sparsity_name(k): v for k, v in lrs.items()},
                   "lora_learning_rate": lora_lr},
        "total_params": exp.total,
        "sft": {"history": exp.sft_history, "steps": exp.sft_history[-1]["step"],
                "dev_accuracy": exp.sft_history[-1]["accuracy"],
                "test_accuracy": exp.base_accuracy, "seconds": exp.sft_seconds},
        "runs": [r.to_dict() for r in runs.values()],
        "measurements": m,
    }
    res["verdicts"] = verdicts(m)
    res["seconds"] = time.perf_counter() - t_start
    res = to_python(res)
    run_dir.write_json_atomic(os.path.join(out_dir, "results.json"), res)
    write_markdown(os.path.join(out_dir, "results.md"), res)
    plot(out_dir, res)
    if progress:
        print(open(os.path.join(out_dir, "results.md"), encoding="utf-8").read())
    print(f"wrote {out_dir} in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:  # also sparsejax.runs.signals.Interrupted
        print("interrupted (this run keeps no checkpoints: rerun the command)",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(getattr(stop, "exit_code", 130))
    except Exception as e:
        run_dir_mod = sys.modules.get("sparsejax.runs.run_dir")
        if run_dir_mod is None or not isinstance(e, run_dir_mod.RunError):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
