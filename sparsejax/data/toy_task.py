"""A synthetic RLVR task small enough for CPU: multi-digit addition, asked in text.

The papers this library reimplements finetune 0.5B-8B models on GSM8K/MATH; that
needs a GPU and downloads. This module gives the same pipeline a task with an
exactly checkable answer that is generated in code, so the experiments and tests
run anywhere with nothing downloaded:

* **the task**: ``"12+345="`` -> ``"357"``; operands are uniform in
  ``[0, 10**digits)``; problems are drawn by a seeded NumPy generator, so a split is
  a pure function of its seed (:func:`make_problems`);
* **the tokenizer**: one token per character (digits, ``+``, ``=``) plus
  ``<pad> <bos> <eos> <unk>``, a ``tokenizers`` WordLevel model wrapped in
  :class:`transformers.PreTrainedTokenizerFast` (:func:`build_tokenizer`), so the
  trainers decode completions exactly as they would for a real model;
* **the reward**: 1.0 iff the completion, stripped of surrounding whitespace, is the
  canonical decimal answer (no sign, no leading zeros, nothing else), else 0.0
  (:func:`extract_answer`, :func:`reward_fn`);
* **the SFT warm-up**: a small Qwen2-architecture decoder (:func:`model_config`)
  trained from scratch with ``optax.adamw`` on the answer tokens until its greedy
  accuracy on held-out problems enters a target band (:func:`sft_warmup`), so RL
  starts from a policy that is right part of the time, as the papers' base models
  are on GSM8K.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparsejax.generation.sampler import SamplingParams, generate, left_pad
from sparsejax.models.config import DecoderConfig
from sparsejax.models.logprobs import token_logprobs

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARACTERS = tuple("0123456789+=")
_ANSWER = re.compile(r"[0-9]+")


# ----------------------------------------------------------------------------- problems


@dataclasses.dataclass(frozen=True)
class Problem:
    """One addition problem: ``prompt`` (``"a+b="``) and its canonical ``answer``."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def make_problems(n: int, seed: int, *, digits: int = 3,
                  exclude: Sequence[Problem] = ()) -> list[Problem]:
    """``n`` distinct problems with operands uniform in ``[0, 10**digits)``.

    Deterministic for ``(n, seed, digits, exclude)``; problems in ``exclude`` (e.g.
    a held-out split) are never drawn.
    """
    limit = 10 ** digits
    if n > limit * limit - len(exclude):
        raise ValueError(f"only {limit * limit} problems have {digits}-digit operands")
    rng = np.random.default_rng([int(seed), 0xADD])
    seen = {(p.a, p.b) for p in exclude}
    out: list[Problem] = []
    while len(out) < n:
        ab = rng.integers(0, limit, size=(2 * (n - len(out)) + 8, 2))
        for a, b in ab.tolist():
            if (a, b) not in seen:
                seen.add((a, b))
                out.append(Problem(a, b))
                if len(out) == n:
                    break
    return out


def sample_batch(rng: np.random.Generator, n: int, digits: int,
                 exclude: set[tuple[int, int]] | frozenset = frozenset()) -> list[Problem]:
    """``n`` fresh problems from ``rng`` (repeats allowed), none of them in ``exclude``."""
    limit = 10 ** digits
    out: list[Problem] = []
    while len(out) < n:
        for a, b in rng.integers(0, limit, size=(n - len(out), 2)).tolist():
            if (a, b) not in exclude:
                out.append(Problem(a, b))
    return out


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer() -> Any:
    """A character-level ``PreTrainedTokenizerFast`` for the task, built in code.

    Ids: ``<pad>=0, <bos>=1, <eos>=2, <unk>=3``, then ``0-9 + =``. Encoding adds
    ``<bos>`` in front (``add_special_tokens=True``); decoding concatenates the
    characters with no separator, and ``skip_special_tokens=True`` drops the four
    special tokens.
    """

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token (whitespace included, which maps to <unk>).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK)


def encode_prompts(tokenizer: Any, problems: Sequence[Problem]) -> list[list[int]]:
    """Token ids of each prompt, ``<bos>`` first (what the trainers take)."""
    return [tokenizer(p.prompt)["input_ids"] for p in problems]


# ----------------------------------------------------------------------------- reward


def extract_answer(completion: str) -> str | None:
    """The answer a completion states: its digits, or None if it is malformed.

    The completion must be, after stripping surrounding whitespace, a non-empty run
    of ASCII digits with no leading zero (``"0"`` itself is fine). Anything else
    (``"35 7"``, ``"357=357"``, ``"+357"``, ``"0357"``, ``""``) states no answer.
    """
    text = completion.strip()
    if not _ANSWER.fullmatch(text):
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    return text


def reward_fn(completions: Sequence[str], answers: Sequence[Any]) -> list[float]:
    """1.0 where the extracted answer is exactly the canonical answer, else 0.0."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    out = []
    for text, answer in zip(completions, answers):
        got = extract_answer(text)
        out.append(1.0 if got is not None and got == str(answer) else 0.0)
    return out


# ----------------------------------------------------------------------------- model


def model_config(tokenizer: Any, *, hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 4, num_kv_heads: int = 2,
                 intermediate_size: int | None = None) -> DecoderConfig:
    """A tiny Qwen2-architecture decoder (q/k/v biases, tied embeddings, float32)."""
    head_dim = hidden_size // num_heads
    return DecoderConfig(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, qkv_bias=True,
        max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id,
        param_dtype="float32", attention_impl="xla")


def max_answer_tokens(digits: int) -> int:
    """Completion budget: the longest answer (``digits + 1`` digits), EOS, one spare."""
    return digits + 3


def greedy_accuracy(graphdef: nnx.GraphDef, params: Any, tokenizer: Any,
                    problems: Sequence[Problem], *, digits: int,
                    batch_size: int = 256) -> float:
    """Fraction of ``problems`` whose greedy completion earns reward 1."""
    sampling = SamplingParams(max_new_tokens=max_answer_tokens(digits), temperature=0.0,
                              stop_token_ids=(tokenizer.eos_token_id,))
    ids = encode_prompts(tokenizer, problems)
    correct = 0.0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - real)  # one compiled shape
        tokens, mask = left_pad(chunk, tokenizer.pad_token_id)
        out = generate(graphdef, params, tokens, mask, jax.random.key(0), sampling,
                       pad_id=tokenizer.pad_token_id)
        toks, m = np.asarray(out.tokens)[:real], np.asarray(out.mask)[:real].astype(bool)
        texts = [tokenizer.decode(t[k].tolist(), skip_special_tokens=True)
                 for t, k in zip(toks, m)]
        correct += sum(reward_fn(texts, [p.answer for p in problems[start:start + real]]))
    return correct / max(1, len(problems))


# ----------------------------------------------------------------------------- SFT


def sft_batch(tokenizer: Any, problems: Sequence[Problem], length: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, attention_mask, loss_mask)`` for ``<bos> prompt answer <eos>``.

    Right padded to ``length``. ``loss_mask[:, t]`` (shape ``[B, length - 1]``) is 1
    where ``tokens[:, t + 1]`` is an answer token or the EOS: the loss sees only
    what the model must produce.
    """
    b = len(problems)
    vocab = tokenizer.get_vocab()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokens = np.full((b, length), tokenizer.pad_token_id, np.int32)
    attn = np.zeros((b, length), np.int32)
    loss = np.zeros((b, length - 1), np.float32)
    for i, p in enumerate(problems):
        prompt = [bos] + [vocab[c] for c in p.prompt]  # what build_tokenizer encodes
        seq = prompt + [vocab[c] for c in p.answer] + [eos]
        if len(seq) > length:
            raise ValueError(f"problem {p} needs {len(seq)} tokens, more than {length}")
        tokens[i, :len(seq)] = seq
        attn[i, :len(seq)] = 1
        loss[i, len(prompt) - 1:len(seq) - 1] = 1.0
    return tokens, attn, loss


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised warm-up settings.

    Training stops at the first evaluation whose held-out greedy accuracy lies in
    ``[band_low, band_high]``, at the first one above the band (if it jumped over it
    between two evaluations), or after ``max_steps``.
    """

    max_steps: int = 4000
    batch_size: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    eval_every: int = 100
    band_low: float = 0.3
    band_high: float = 0.7
    seed: int = 0


def sft_warmup(graphdef: nnx.GraphDef, params: Any, tokenizer: Any,
               eval_problems: Sequence[Problem], config: SFTConfig = SFTConfig(), *,
               digits: int = 3, progress: Callable[[dict[str, Any]], None] | None = None
               ) -> tuple[Any, list[dict[str, Any]]]:
    """Supervised training on fresh random problems until accuracy enters the band.

    Cross-entropy (mean over answer and EOS tokens, via :func:`token_logprobs`) with
    ``optax.adamw`` after a linear warm-up. Training problems are drawn from a
    generator seeded by ``config.seed`` and never include an ``eval_problems`` one.

    Returns:
        ``(params, history)``; ``history`` holds one ``{"step", "loss",
        "accuracy"}`` record per evaluation (the last is where it stopped).
    """
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, max(1, config.warmup_steps)),
         optax.constant_schedule(config.learning_rate)], [max(1, config.warmup_steps)])
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
    opt_state = tx.init(params)
    length = 1 + (2 * digits + 2) + (digits + 1) + 1

    @jax.jit
    def step(params, opt_state, tokens, attn, loss_mask):
        def loss_fn(p):
            logp = token_logprobs(graphdef, p, tokens, attn)
            return -jnp.sum(logp * loss_mask) / jnp.sum(loss_mask)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng([int(config.seed), 0x5F7])
    exclude = frozenset((p.a, p.b) for p in eval_problems)
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    for i in range(1, config.max_steps + 1):
        batch = sft_batch(tokenizer, sample_batch(rng, config.batch_size, digits, exclude),
                          length)
        params, opt_state, loss = step(params, opt_state, *batch)
        losses.append(float(loss))
        if i % config.eval_every == 0 or i == config.max_steps:
            acc = greedy_accuracy(graphdef, params, tokenizer, eval_problems, digits=digits)
            record = {"step": i, "loss": float(np.mean(losses[-config.eval_every:])),
                      "accuracy": acc}
            history.append(record)
            if progress is not None:
                progress(record)
            if config.band_low <= acc <= config.band_high:
                break
            if acc > config.band_high:
                break  # overshot the band between two evaluations: stop anyway
    return params, history
