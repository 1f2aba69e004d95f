"""Unpaired, labelled examples for KTO: splitting, tokenizing, padding, and the
mismatched pairs of its KL reference point.

An example is a dict with ``prompt`` (a string, or a list of chat messages),
``completion`` (a string, or messages whose last assistant turn is the completion) and
``label`` (a bool: True for a desirable completion). Preference pairs
(``prompt``/``chosen``/``rejected``) are unpaired first (:func:`unpair`: the chosen
completion desirable, the rejected one undesirable). Prompts and completions are encoded
as DPO's are (:mod:`sparsejax.trainers.dpo_data`): one width per dataset, so nothing
recompiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from sparsejax.trainers.dpo_data import (
    completion_text,
    encode_completions,
    encode_prompts,
    split_pair,
)

Example = Mapping[str, Any]


class EncodedExamples(NamedTuple):
    """Tokenized examples, ``N`` of them, prompt width ``P``, completion width ``C``.

    ``prompt_tokens, prompt_mask [N, P]`` int32, left padded; ``completion_tokens,
    completion_mask [N, C]`` int32, right padded (EOS included unless truncated away);
    ``label [N]`` bool (True: desirable).
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    completion_tokens: np.ndarray
    completion_mask: np.ndarray
    label: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.prompt_tokens.shape[0])

    def take(self, indices: np.ndarray) -> EncodedExamples:
        """The examples at ``indices`` (repeats allowed)."""
        return EncodedExamples(*(x[indices] for x in self))

    def recombined(self, prompts: np.ndarray, completions: np.ndarray) -> EncodedExamples:
        """Row ``i``: the prompt (and label) of example ``prompts[i]`` with the completion of
        example ``completions[i]`` (the mismatched pairs of the KL estimate)."""
        return EncodedExamples(self.prompt_tokens[prompts], self.prompt_mask[prompts],
                               self.completion_tokens[completions],
                               self.completion_mask[completions], self.label[prompts])

    def num_tokens(self) -> int:
        """Real tokens of these examples (prompt and completion)."""
        return int(self.prompt_mask.sum() + self.completion_mask.sum())


def is_paired(rows: Sequence[Example]) -> bool:
    """Whether the rows are preference pairs (``chosen``/``rejected``, no ``completion``)."""
    first = rows[0] if rows else None
    return (isinstance(first, Mapping) and "chosen" in first and "rejected" in first
            and "completion" not in first)


def unpair(pairs: Sequence[Example]) -> list[dict[str, Any]]:
    """Preference pairs as unpaired examples: per pair, its chosen completion (label True)
    then its rejected one (label False), with the pair's prompt."""
    out = []
    for pair in pairs:
        prompt, chosen, rejected = split_pair(pair)
        out.append({"prompt": prompt, "completion": chosen, "label": True})
        out.append({"prompt": prompt, "completion": rejected, "label": False})
    return out


def split_example(example: Example) -> tuple[str | list[dict[str, str]], str, bool]:
    """``(prompt, completion text, label)`` of one example (see the module docstring)."""
    missing = [k for k in ("prompt", "completion", "label") if k not in example]
    if missing:
        raise ValueError(f"example lacks {missing}; it has {sorted(example)}")
    label = example["label"]
    if isinstance(label, (bool, np.bool_)) or (isinstance(label, int) and label in (0, 1)):
        label = bool(label)
    else:
        raise ValueError(f"label must be true or false, got {label!r}")
    prompt = example["prompt"]
    if not isinstance(prompt, str):
        prompt = [dict(m) for m in prompt]
    completion = example["completion"]
    if not isinstance(completion, str):
        completion = completion_text(completion)
    return prompt, completion, label


def encode_examples(tokenizer: Any, examples: Sequence[Example], *, max_prompt_length: int,
                    max_completion_length: int, chat_template: bool | None = None
                    ) -> EncodedExamples:
    """Tokenizes, truncates and pads labelled examples (prompts as
    :func:`~sparsejax.trainers.dpo_data.encode_prompts`, completions as
    :func:`~sparsejax.trainers.dpo_data.encode_completions` encode them)."""
    if not examples:
        raise ValueError("no examples")
    prompts, completions, labels = zip(*(split_example(e) for e in examples))
    prompt_tokens, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_length,
                                                chat_template)
    tokens, mask = encode_completions(tokenizer, completions, max_completion_length)
    return EncodedExamples(prompt_tokens, prompt_mask, tokens, mask, np.asarray(labels, bool))


def mismatched_index(order: np.ndarray, group: int) -> np.ndarray:
    """The completion each position of ``order`` is paired with for the KL estimate: within
    each consecutive group of ``group`` positions (the last may be shorter) the completions
    rotate by one, ``(x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})``, so a group's mismatched
    completions are its own completions, each under another prompt."""
    order = np.asarray(order)
    return np.concatenate([np.roll(order[s:s + group], 1)
                           for s in range(0, len(order), group)]) if len(order) else order

