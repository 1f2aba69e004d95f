"""KTO (Kahneman-Tversky Optimization) on labelled, unpaired examples with sparse
(default: 1% of the weights) or full finetuning.

The ``sparsejax kto`` command as a script; the code, the flags and their help are in
``sparsejax/cli/kto.py`` (``--help`` lists them):

    python experiments/kto.py                          # Qwen2.5-0.5B-Instruct, KTO mix
    python experiments/kto.py --dataset examples.jsonl --sparsity 0 --lr 1e-6
    python experiments/kto.py --config run.yaml        # settings from a file
"""

from sparsejax.cli.kto import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli()
