"""Datasets for RL finetuning: GSM8K problems, gold answers and ``\\boxed{}`` prompts."""

from sparsejax.data.gsm8k import *  # noqa: F403 - the public names of gsm8k
from sparsejax.data.gsm8k import __all__  # noqa: F401
