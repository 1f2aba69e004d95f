"""GSM8K (Cobbe et al., arXiv 2110.14168): loading, gold answers and ``\\boxed{}`` prompts.

Each record has a ``question`` and an ``answer`` whose last line is ``#### N``; the gold answer
is the text after ``####`` with thousands commas removed. Prompts follow the RLVR recipe of the
Multiple Ticket Hypothesis runs (arXiv 2602.01599): the question, then an instruction to reason
step by step and put the final answer in ``\\boxed{}``, rendered through the tokenizer's chat
template with the generation prompt appended, so that completions can be scored by
:func:`sparsejax.rewards.gsm8k_accuracy_reward`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsejax.data.jsonl import read_jsonl

if TYPE_CHECKING:  # datasets is imported lazily: importing it costs about a second
    import datasets

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

GSM8K_HF_NAME = "openai/gsm8k"
GSM8K_SPLITS: tuple[str, ...] = ("train", "test")
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def parse_gold_answer(answer: str) -> str:
    """The gold answer of a GSM8K ``answer`` field: the text after the last ``####``, commas removed.

    Raises:
        ValueError: if ``answer`` has no ``####`` marker or nothing after it.
    """
    if not isinstance(answer, str) or "####" not in answer:
        raise ValueError(f"Not a GSM8K answer (no '####' marker): {answer!r:.80}")
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise ValueError(f"Empty gold answer after '####': {answer!r:.80}")
    return gold


def load_gsm8k(
    split: str = "train",
    *,
    data_dir: str | Path | None = None,
    config: str = "main",
    limit: int | None = None,
) -> datasets.Dataset:
    """Load one GSM8K split as a :class:`datasets.Dataset` with columns ``question``, ``answer``, ``gold``.

    Args:
        split: ``"train"`` (7,473 problems) or ``"test"`` (1,319).
        data_dir: a folder holding ``{split}.jsonl`` (fields ``question`` and ``answer``). When
            ``None``, the split is fetched with ``datasets.load_dataset("openai/gsm8k", config)``.
        config: the Hub configuration (``"main"`` or ``"socratic"``); unused with ``data_dir``.
        limit: keep only the first ``limit`` problems.
    """
    import datasets

    if split not in GSM8K_SPLITS:
        raise ValueError(f"Unknown GSM8K split {split!r}; expected one of {GSM8K_SPLITS}.")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    if data_dir is None:
        ds = datasets.load_dataset(GSM8K_HF_NAME, config, split=split)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return ds.map(lambda ex: {"gold": parse_gold_answer(ex["answer"])})
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K split file not found: {path}")
    rows = read_jsonl(path)
    if limit is not None:
        rows = rows[:limit]
    for i, row in enumerate(rows):
        if "question" not in row or "answer" not in row:
            raise ValueError(f"{path}: record {i} lacks 'question' or 'answer'.")
    return datasets.Dataset.from_dict(
        {
            "question": [r["question"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "gold": [parse_gold_answer(r["answer"]) for r in rows],
        }
    )


def build_messages(
    question: str,
    *,
    system_prompt: str | None = None,
    instruction: str = BOXED_INSTRUCTION,
) -> list[dict[str, str]]:
    """Chat messages asking ``question`` and for the final answer in ``\\boxed{}``.

    The user turn is ``"{question}\\n{instruction}"``; a system turn is added only when
    ``system_prompt`` is given (otherwise the chat template's default, if any, applies).
    """
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    content = question.strip()
    if instruction:
        content = f"{content}\n{instruction}"
    messages.append({"role": "user", "content": content})
    return messages


def format_prompt(
    question: str,
    tokenizer: Any,
    *,
    system_prompt: str | None = None,
    instruction: str = BOXED_INSTRUCTION,
) -> str:
    """The prompt text for ``question``: :func:`build_messages` through ``tokenizer``'s chat template.

    Uses ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``,
    so the text ends where the assistant's answer begins.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The tokenizer has no chat template; set tokenizer.chat_template first.")
    messages = build_messages(question, system_prompt=system_prompt, instruction=instruction)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def with_prompts(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    system_prompt: str | None = None,
    instruction: str = BOXED_INSTRUCTION,
) -> datasets.Dataset:
    """``dataset`` with a ``prompt`` column of chat-templated prompts (see :func:`format_prompt`)."""
    prompts = [
        format_prompt(q, tokenizer, system_prompt=system_prompt, instruction=instruction)
        for q in dataset["question"]
    ]
    return dataset.add_column("prompt", prompts)
