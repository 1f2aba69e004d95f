"""GRPO on GSM8K with sparse (default: 1% of the weights) or full finetuning.

Defaults mirror the Multiple Ticket Hypothesis GSM8K run (arXiv 2602.01599):
Qwen2.5-0.5B-Instruct, 32 prompts x 16 samples per step, 100 steps, at most 1024 new
tokens, a per-tensor random mask at 99% sparsity (seed 0), LR 1e-4; advantage =
reward - group mean, no KL; the prompt asks for the answer in \\boxed{}.
``--sparsity 0`` is full finetuning (the paper's LR 1e-6). This is ``grpo.py --task
gsm8k`` (one implementation): other tasks, datasets and rewards go through grpo.py.

    python experiments/grpo_gsm8k.py                                  # hub model + data
    python experiments/grpo_gsm8k.py --model ./Qwen2.5-0.5B-Instruct \\
        --data-dir ../shared/data/gsm8k                                # local files
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo  # noqa: E402
from common import run_main  # noqa: E402

ENTRY = {"doc": __doc__, "task": "gsm8k", "out_dir": "runs/grpo_gsm8k"}


def parse_args(argv=None) -> argparse.Namespace:
    return grpo.parse_args(argv, ENTRY)


def check_args(args: argparse.Namespace) -> None:
    """Every flag, the model folder and the data files, before anything heavy."""
    grpo.check_args(args)


def main(argv=None) -> int:
    return grpo.main(argv, ENTRY)


if __name__ == "__main__":
    run_main(main)
