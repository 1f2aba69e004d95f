"""DPO and its family (IPO, SimPO, ORPO, MPO, ...) with sparse (default: 1% of the weights)
or full finetuning.

The ``sparsejax dpo`` command as a script; the code, the flags and their help are in
``sparsejax/cli/dpo.py`` (``--help`` lists them):

    python experiments/dpo.py                          # Qwen2.5-0.5B-Instruct, UltraFeedback
    python experiments/dpo.py --dataset pairs.jsonl --sparsity 0 --lr 1e-6
    python experiments/dpo.py --config run.yaml        # settings from a file
"""

from sparsejax.cli.dpo import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
