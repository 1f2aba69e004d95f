"""Preference pairs for DPO: splitting, tokenizing, truncating and padding them.

See :mod:`sparsejax.trainers.dpo` for the data format; :class:`EncodedPairs` is what
the trainer steps on (one width per dataset, so nothing recompiles).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from sparsejax.data.order import prompt_order
from sparsejax.generation.sampler import bucket_length, left_pad, pad_token_id

Pair = Mapping[str, Any]
Messages = Sequence[Mapping[str, str]]


# ---------------------------------------------------------------------- data


class EncodedPairs(NamedTuple):
    """Tokenized preference pairs, ``N`` pairs, prompt width ``P``, completion width ``C``.

    ``prompt_tokens, prompt_mask [N, P]`` int32, left padded; ``chosen_tokens,
    chosen_mask, rejected_tokens, rejected_mask [N, C]`` int32, right padded (EOS
    included in the mask unless truncated away).
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    chosen_tokens: np.ndarray
    chosen_mask: np.ndarray
    rejected_tokens: np.ndarray
    rejected_mask: np.ndarray

    @property
    def num_pairs(self) -> int:
        return int(self.prompt_tokens.shape[0])

    def take(self, indices: np.ndarray) -> EncodedPairs:
        """The pairs at ``indices`` (repeats allowed)."""
        return EncodedPairs(*(x[indices] for x in self))

    def num_tokens(self) -> int:
        """Real tokens scored for these pairs (the prompt counts twice)."""
        return int(2 * self.prompt_mask.sum() + self.chosen_mask.sum()
                   + self.rejected_mask.sum())


def completion_text(completion: str | Messages) -> str:
    """The completion of a pair side: a string, or the last assistant turn of messages."""
    if isinstance(completion, str):
        return completion
    for message in reversed(list(completion)):
        if message.get("role") == "assistant":
            return str(message.get("content", ""))
    raise ValueError("a chosen/rejected message list has no assistant turn")


def split_pair(pair: Pair) -> tuple[str | list[dict[str, str]], str, str]:
    """``(prompt, chosen text, rejected text)`` of one pair (see the module docstring)."""
    missing = [k for k in ("chosen", "rejected") if k not in pair]
    if missing:
        raise ValueError(f"preference pair lacks {missing}; it has {sorted(pair)}")
    chosen, rejected = pair["chosen"], pair["rejected"]
    prompt = pair.get("prompt")
    if prompt is None:
        if isinstance(chosen, str):
            raise ValueError("preference pair has no 'prompt' (and 'chosen' is a string, "
                             "so none can be read from its messages)")
        messages = list(chosen)
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not turns:
            raise ValueError("a chosen message list has no assistant turn")
        prompt = [dict(m) for m in messages[:turns[-1]]]
    elif not isinstance(prompt, str):
        prompt = [dict(m) for m in prompt]
    return prompt, completion_text(chosen), completion_text(rejected)


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)`` int32 ``[B, length]`` with each sequence left-aligned."""
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for i, s in enumerate(sequences):
        s = list(s)[:length]
        tokens[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return tokens, mask


def encode_pairs(tokenizer: Any, pairs: Sequence[Pair], *, max_prompt_length: int,
                 max_completion_length: int, chat_template: bool | None = None
                 ) -> EncodedPairs:
    """Tokenizes, truncates and pads preference pairs (see the module docstring).

    Args:
        tokenizer: a transformers tokenizer with an EOS token.
        pairs: dicts with ``prompt`` / ``chosen`` / ``rejected``.
        max_prompt_length: prompts keep their last this many tokens.
        max_completion_length: completions (+ EOS) keep their first this many tokens.
        chat_template: format prompts with the chat template (None: when the tokenizer
            has one). Without it, prompts must be strings, encoded with special tokens.

    Returns:
        :class:`EncodedPairs` padded to the longest prompt / completion (bucketed with
        :func:`~sparsejax.generation.sampler.bucket_length`, capped at the maxima).
    """
    if not pairs:
        raise ValueError("no preference pairs")
    prompts, chosen, rejected = zip(*(split_pair(p) for p in pairs))
    prompt_tokens, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_length,
                                                chat_template)
    tokens, mask = encode_completions(tokenizer, list(chosen) + list(rejected),
                                      max_completion_length)
    n = len(pairs)
    return EncodedPairs(prompt_tokens, prompt_mask, tokens[:n], mask[:n], tokens[n:], mask[n:])


def encode_prompts(tokenizer: Any, prompts: Sequence[str | Messages], max_prompt_length: int,
                   chat_template: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)`` int32 ``[N, P]`` of prompts, truncated from the left to
    ``max_prompt_length`` and left padded to the longest (bucketed, capped).

    With ``chat_template`` (None: when the tokenizer has one) a string prompt is one user
    turn and the generation prompt is added; without it prompts must be strings, encoded
    with special tokens.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end completions with")
    if chat_template is None:
        chat_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template:
        texts = [tokenizer.apply_chat_template(
            [{"role": "user", "content": p}] if isinstance(p, str) else p,
            tokenize=False, add_generation_prompt=True) for p in prompts]
        prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("chat-format prompts need a tokenizer with a chat template")
        prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("a prompt encodes to no tokens: the first completion token "
                         "needs a context")
    prompt_ids = [list(p)[-max_prompt_length:] for p in prompt_ids]
    width = min(max_prompt_length, bucket_length(max(len(p) for p in prompt_ids)))
    return left_pad(prompt_ids, pad_token_id(tokenizer), width)


def encode_completions(tokenizer: Any, texts: Sequence[str], max_completion_length: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)`` int32 ``[N, C]`` of completions: plain text + EOS, truncated from
    the right to ``max_completion_length``, right padded to the longest (bucketed, capped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to end completions with")
    ids = [list(c) + [eos] for c in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    ids = [c[:max_completion_length] for c in ids]
    width = min(max_completion_length, bucket_length(max(len(c) for c in ids)))
    return right_pad(ids, pad_token_id(tokenizer), width)


def visited_pairs(num_pairs: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Boolean ``[num_pairs]``: the pairs that steps ``[0, steps)`` use."""
    seen = np.zeros(num_pairs, bool)
    total = steps * batch_size
    if total >= num_pairs:
        seen[:] = True  # each epoch is a permutation of all pairs
    else:
        seen[prompt_order(num_pairs, 0, total, seed)] = True
    return seen
