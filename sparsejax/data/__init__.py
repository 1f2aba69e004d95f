"""Datasets for RL finetuning: GSM8K problems, gold answers and ``\\boxed{}`` prompts."""

from sparsejax.data.gsm8k import (
    BOXED_INSTRUCTION,
    GSM8K_HF_NAME,
    GSM8K_SPLITS,
    build_messages,
    format_prompt,
    load_gsm8k,
    parse_gold_answer,
    with_prompts,
)

__all__ = [
    "BOXED_INSTRUCTION",
    "GSM8K_HF_NAME",
    "GSM8K_SPLITS",
    "build_messages",
    "format_prompt",
    "load_gsm8k",
    "parse_gold_answer",
    "with_prompts",
]
