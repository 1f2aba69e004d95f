"""``python -m sparsejax.reproduce <experiment> --scale cpu|paper|quick``: the papers'
experiments, one command each (see :mod:`sparsejax.reproduce`)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from sparsejax.reproduce.scales import SCALES

NAMES = ("multiple_tickets", "subnetworks", "predicted_masks")  # what ``all`` runs
OPTIONAL = ("alternatives",)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sparsejax.reproduce",
        description="Reproduce a paper's experiment on a real model: multiple_tickets "
                    "(random 99% masks vs full finetuning, a sparsity sweep), subnetworks "
                    "(update sparsity, subnetwork retraining, overlap), predicted_masks "
                    "(masks from early deltas vs random masks), all (those three), or "
                    "alternatives (80/20 tokens, LoRA and masked LoRA vs a random 99%% "
                    "mask; not in all). Arms are cached under --root and a killed run "
                    "continues where it stopped.")
    p.add_argument("experiment", choices=(*NAMES, *OPTIONAL, "all"))
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu",
                   help="quick: the shipped demo model (minutes); cpu: SmolLM2-135M on the "
                        "arithmetic task; paper: the papers' model and data (GPU) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="added to every seed (data order, sampling, masks) (default: %(default)s)")
    p.add_argument("--root", default=None,
                   help="folder of the arms (default runs/reproduce/<scale>_seed<seed>)")
    p.add_argument("--results", default=None,
                   help="where the tables and plots go (default <root>/results)")
    p.add_argument("--plan", action="store_true",
                   help="only shape-check an arm with experiments/memory_plan.py (the scales "
                        "that name a plan) and print the arms' commands")
    p.add_argument("--quiet", action="store_true",
                   help="keep the arms' output in their logs only")
    args = p.parse_args(argv)
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    args.root = args.root or os.path.join("runs", "reproduce", f"{args.scale}_seed{args.seed}")
    args.results = args.results or os.path.join(args.root, "results")
    return args


def plan(args: argparse.Namespace) -> int:
    """Prints every arm's command; runs the memory plan of the scale's rollout shape."""
    from sparsejax.reproduce.suite import Suite
    scale = SCALES[args.scale]
    suite = Suite(scale, args.root, seed=args.seed)
    suite._model = scale.model  # the commands only: nothing is downloaded or converted
    for name, sparsity in (("full", 0.0), ("random99_mask0", 0.99), ("random99.99_mask0",
                                                                     0.9999)):
        flags, _ = suite.arm_flags(name, sparsity=sparsity)
        print("sparsejax grpo " + " ".join(flags))
    if scale.plan is None:
        print(f"scale {scale.name} names no memory plan", file=sys.stderr)
        return 0
    script = os.path.join(os.path.dirname(__file__), "..", "..", "experiments",
                          "memory_plan.py")
    if not os.path.exists(script):
        print("experiments/memory_plan.py is not in this checkout; run it from the "
              "repository", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, script, *scale.plan, "--sparsity", "0.99"]).returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.plan:
        return plan(args)
    from sparsejax.reproduce import experiments, report
    from sparsejax.reproduce.suite import Suite, SuiteError
    suite = Suite(SCALES[args.scale], args.root, seed=args.seed, quiet=args.quiet)
    names = NAMES if args.experiment == "all" else (args.experiment,)
    try:
        info = report.provenance(suite.scale, suite.model, args.seed, argv)
        for name in names:
            outcome = experiments.EXPERIMENTS[name](suite)
            paths = report.write(outcome, info, args.results)
            print(f"{name}: " + "; ".join(f"{c}: {v['verdict']}"
                                          for c, v in outcome.verdicts.items()))
            print(f"  tables: {paths['md']}  plots: {paths['png']}")
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
