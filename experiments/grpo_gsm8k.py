"""GRPO on GSM8K with sparse (default: 1% of the weights) or full finetuning.

``grpo.py --task gsm8k`` with only the GSM8K data flags (one implementation:
``sparsejax/cli/grpo.py``); defaults mirror the Multiple Ticket Hypothesis GSM8K run.

    python experiments/grpo_gsm8k.py                                  # hub model + data
    python experiments/grpo_gsm8k.py --model ./Qwen2.5-0.5B-Instruct \\
        --data-dir ./gsm8k                                             # local files
"""

from sparsejax.cli.grpo import gsm8k_cli as cli
from sparsejax.cli.grpo import gsm8k_main as main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
