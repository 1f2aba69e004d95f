"""GRPO on any dataset and reward, with sparse (default: 1% of the weights) or full finetuning.

The ``sparsejax grpo`` command as a script; the code, the flags and their help are in
``sparsejax/cli/grpo.py`` (``--help`` lists them):

    python experiments/grpo.py --demo                    # ~1 minute on a CPU, offline
    python experiments/grpo.py --task math               # MATH train, MATH-500 eval
    python experiments/grpo.py --dataset my_task.jsonl --prompt-field question \\
        --answer-field answer --reward exact --reward format=0.1
    python experiments/grpo.py --config run.yaml         # settings from a file
"""

from sparsejax.cli.grpo import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
