"""DPO (Rafailov et al., arXiv 2305.18290) and its variants with sparse or full finetuning.

One step::

    pairs of step t --tokenize/pad (fixed widths)--> prompt + chosen / rejected tokens
      --> sequence log-probs (policy; chosen and rejected in one forward pass)
      --> dpo_loss against the reference log-probs (precomputed once)
      --> gradients at the active entries (micro-batched, accumulated)
      --> fused sparse AdamW step (or dense optax.adamw) --> next step

Data: a pair is a dict with ``prompt`` (a string, or a list of chat messages) and
``chosen`` / ``rejected`` (strings, or lists of messages whose last assistant turn is the
completion; without ``prompt`` the messages before that turn are the prompt). Prompts go
through the tokenizer's chat template when it has one (``add_generation_prompt=True``);
completions are plain text followed by EOS. Prompts are truncated from the left to
``max_prompt_length`` and completions from the right to ``max_completion_length``, then
prompts are left padded and completions right padded to one width per dataset (the
longest, bucketed, capped at the configured maximum), so every step of a run has the
same shapes and nothing recompiles.

Reference log-probs are computed ONCE per run, before the first step, for the pairs the
run will visit (and the eval pairs), in fixed chunks of the dataset (so a pair's value
does not depend on how long the run is: a resumed run gets bit-identical values). The
reference is the base model: a sparse run swaps the base values of its ``k`` active
entries into the params in place (``Updater.swap_active``), scores and swaps back; no
second copy of the model exists. A dense run scores with the params before they first
change and keeps a host (CPU memory) copy of the base params only for pairs first seen
later (:meth:`DPOTrainer.evaluate` after training). ``reference_free`` uses zeros.

Everything a step needs is a function of the step number (pair order) and the
checkpoint, so ``resume`` continues exactly as an uninterrupted run would. A sparse
run's checkpoint holds the ``k`` trained values and the optimizer state; the rest of
the model comes from the base weights the run was started from.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparsejax import checkpoint as ckpt_lib
from sparsejax.losses.dpo import dpo_loss
from sparsejax.models.decoder import reconfigure
from sparsejax.models.logprobs import completion_logprobs
from sparsejax.sampling import bucket_length, left_pad, pad_token_id
from sparsejax.trainers.config import SparseConfig
from sparsejax.trainers.dpo_config import DPOConfig
from sparsejax.trainers.policy_run import PolicyRun
from sparsejax.trainers.grpo import prompt_order
from sparsejax.trainers.reporting import compile_seconds, peak_memory_bytes, plot_curves
from sparsejax.trainers.updater import Updater, tree_bytes

PyTree = Any
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

    def take(self, indices: np.ndarray) -> "EncodedPairs":
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
        :func:`~sparsejax.sampling.bucket_length`, capped at the maxima).
    """
    if not pairs:
        raise ValueError("no preference pairs")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token to end completions with")
    if chat_template is None:
        chat_template = bool(getattr(tokenizer, "chat_template", None))
    prompts, chosen, rejected = zip(*(split_pair(p) for p in pairs))
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
    completions = [list(c) + [eos] for c in tokenizer(list(chosen) + list(rejected),
                                                      add_special_tokens=False)["input_ids"]]
    completions = [c[:max_completion_length] for c in completions]
    width_p = min(max_prompt_length, bucket_length(max(len(p) for p in prompt_ids)))
    width_c = min(max_completion_length, bucket_length(max(len(c) for c in completions)))
    pad = pad_token_id(tokenizer)
    prompt_tokens, prompt_mask = left_pad(prompt_ids, pad, width_p)
    n = len(pairs)
    chosen_tokens, chosen_mask = right_pad(completions[:n], pad, width_c)
    rejected_tokens, rejected_mask = right_pad(completions[n:], pad, width_c)
    return EncodedPairs(prompt_tokens, prompt_mask, chosen_tokens, chosen_mask,
                        rejected_tokens, rejected_mask)


def visited_pairs(num_pairs: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """Boolean ``[num_pairs]``: the pairs that steps ``[0, steps)`` use."""
    seen = np.zeros(num_pairs, bool)
    total = steps * batch_size
    if total >= num_pairs:
        seen[:] = True  # each epoch is a permutation of all pairs
    else:
        seen[prompt_order(num_pairs, 0, total, seed)] = True
    return seen


# ---------------------------------------------------------------------- trainer


class DPOTrainer(PolicyRun):
    """Trains a :class:`~sparsejax.models.Decoder` with DPO (sigmoid, IPO, hinge, robust).

    Args:
        graphdef, params: ``nnx.split`` of the policy; these are also the reference.
        tokenizer: a transformers tokenizer (encoding pairs, saving the model).
        config, sparse: the run's :class:`DPOConfig` and :class:`SparseConfig`.
        out_dir: where metrics, checkpoints, plots and the final evaluation go.
        mask: a mask to train (default: built from ``sparse``).
        chat_template: format prompts with the chat template (None: if the tokenizer
            has one).
    """

    def __init__(self, graphdef: nnx.GraphDef, params: PyTree, tokenizer: Any,
                 config: DPOConfig, sparse: SparseConfig, out_dir: str | os.PathLike,
                 mask: PyTree | None = None, *, chat_template: bool | None = None,
                 updater: Any = None):
        self.graphdef, self.params = graphdef, params
        self.graphdef = reconfigure(graphdef, params, remat=config.remat)
        self.tokenizer = tokenizer
        self.cfg, self.sparse_cfg = config, sparse
        self.chat_template = chat_template
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        # The "what trains" variant: given (e.g. sparsejax.lora.LoraUpdater) or built here.
        self.updater = Updater(sparse, params, mask) if updater is None else updater
        self.params = params = self.updater.policy_params(params)
        self.opt_state = self.updater.init(params)
        # The reference: the base values of the k trained entries (sparse); for a dense
        # run the params themselves until they first change, then a host copy.
        self.ref_values = None
        if self.updater.sparse and not config.reference_free:
            self.ref_values = self.updater.active_values(params, self.opt_state)
        self._base_host: PyTree | None = None
        self._pristine = True  # self.params are the base params
        self.step = 0
        self.checkpoints = ckpt_lib.CheckpointManager(
            os.path.join(self.out_dir, "checkpoints"), keep=config.keep_checkpoints)
        self._grad_fn = jax.jit(self._micro_batch_grads, donate_argnums=3)
        self._zero_grads = jax.jit(self._zeros_like_compressed)
        self._logps_fn = jax.jit(self._sequence_logps)
        self._loss_fn = jax.jit(self._loss)

    # ------------------------------------------------------------------ pieces

    def encode(self, pairs: Sequence[Pair]) -> EncodedPairs:
        """Tokenized, truncated and padded pairs (see :func:`encode_pairs`)."""
        return encode_pairs(self.tokenizer, pairs, max_prompt_length=self.cfg.max_prompt_length,
                            max_completion_length=self.cfg.max_completion_length,
                            chat_template=self.chat_template)

    def _sequence_logps(self, params: PyTree, batch: Mapping[str, jax.Array]
                        ) -> tuple[jax.Array, jax.Array]:
        """Summed completion log-probs ``([B] chosen, [B] rejected)``, one forward pass."""
        prompt = jnp.concatenate([batch["prompt_tokens"]] * 2, axis=0)
        prompt_mask = jnp.concatenate([batch["prompt_mask"]] * 2, axis=0)
        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        logps = completion_logprobs(self.graphdef, params, prompt, prompt_mask, tokens, mask,
                                    chunk_size=self.cfg.logprob_chunk_size)
        seq = logps.sum(axis=-1)
        n = batch["prompt_tokens"].shape[0]
        return seq[:n], seq[n:]

    def _loss(self, chosen, rejected, batch):
        cfg = self.cfg
        return dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"],
                        beta=cfg.beta, loss_type=cfg.loss_type,
                        label_smoothing=cfg.label_smoothing,
                        chosen_lengths=batch["chosen_mask"].sum(axis=-1),
                        rejected_lengths=batch["rejected_mask"].sum(axis=-1))

    def _micro_batch_grads(self, params, opt_state, batch, acc, weight):
        """Loss and metrics of one micro-batch; ``acc + weight * gradient`` (compressed)."""

        def loss_fn(p):
            chosen, rejected = self._sequence_logps(p, batch)
            return self._loss(chosen, rejected, batch)

        (loss, metrics), grads = self.updater.value_and_grad(loss_fn, params, opt_state)
        acc = jax.tree.map(lambda a, g: a + (weight * g).astype(a.dtype), acc, grads)
        return {"loss": loss, **metrics}, acc

    def _zeros_like_compressed(self, params, opt_state):
        """A zero gradient accumulator (the compressed gradient's shapes)."""
        return jax.tree.map(jnp.zeros_like, self.updater.compress(params, opt_state))

    def _score(self, params: PyTree, enc: EncodedPairs, needed: np.ndarray | None = None
               ) -> np.ndarray:
        """``[N, 2]`` (chosen, rejected) log-probs, ``micro_batch_size`` pairs at a time.

        Chunks are fixed slices of the dataset (the last padded by repeating its last
        pair), so a pair's value never depends on ``needed``; pairs not needed are NaN.
        """
        n, mb = enc.num_pairs, self.cfg.micro_batch_size
        out = np.full((n, 2), np.nan, np.float32)
        for start in range(0, n, mb):
            idx = np.arange(start, min(start + mb, n))
            if needed is not None and not needed[idx].any():
                continue
            padded = np.concatenate([idx, np.full(mb - len(idx), idx[-1])])
            chosen, rejected = self._logps_fn(params, enc.take(padded)._asdict())
            out[idx, 0] = np.asarray(chosen)[:len(idx)]
            out[idx, 1] = np.asarray(rejected)[:len(idx)]
        return out

    def _keep_base(self) -> None:
        """Before a dense run's params first change: a host copy of the base params."""
        if (self._pristine and not self.updater.sparse and not self.cfg.reference_free):
            self._base_host = jax.tree.map(lambda x: np.array(x, copy=True), self.params)
        self._pristine = False

    def _as_encoded(self, pairs: Sequence[Pair] | EncodedPairs) -> EncodedPairs:
        return pairs if isinstance(pairs, EncodedPairs) else self.encode(pairs)

    def sequence_logprobs(self, pairs: Sequence[Pair] | EncodedPairs
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Summed completion log-probs ``([N] chosen, [N] rejected)`` under the policy."""
        out = self._score(self.params, self._as_encoded(pairs))
        return out[:, 0], out[:, 1]

    def reference_logprobs(self, pairs: Sequence[Pair] | EncodedPairs, *,
                           needed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Summed completion log-probs ``([N] chosen, [N] rejected)`` under the base model.

        Sparse runs swap the base values of the active entries in and back out (in
        place); dense runs use the params while untouched, else the host copy. Zeros
        for ``reference_free``. With ``needed``, only chunks holding needed pairs are
        scored (the rest are NaN).
        """
        enc = self._as_encoded(pairs)
        if self.cfg.reference_free:
            zeros = np.zeros(enc.num_pairs, np.float32)
            return zeros, zeros.copy()
        if self.updater.sparse:
            self.params, current = self.updater.swap_active(
                self.params, self.opt_state.indices, self.ref_values)
            try:
                out = self._score(self.params, enc, needed)
            finally:
                self.params, _ = self.updater.swap_active(self.params, self.opt_state.indices,
                                                          current)
        elif self._pristine:
            out = self._score(self.params, enc, needed)
        else:
            shardings = jax.tree.map(lambda x: x.sharding, self.params)
            out = self._score(jax.device_put(self._base_host, shardings), enc, needed)
        return out[:, 0], out[:, 1]

    # ------------------------------------------------------------------ steps

    def train_step(self, enc: EncodedPairs, ref: np.ndarray) -> dict[str, Any]:
        """One DPO step on the pairs of ``self.step``; ``ref`` is ``[N, 2]``."""
        cfg = self.cfg
        t0, c0 = time.perf_counter(), compile_seconds()
        order = prompt_order(enc.num_pairs, self.step, cfg.batch_size, cfg.seed)
        mb = cfg.micro_batch_size
        num_micro = cfg.batch_size // mb
        acc = self._zero_grads(self.params, self.opt_state)
        micro_metrics = []
        for s in range(0, cfg.batch_size, mb):
            idx = order[s:s + mb]
            batch = enc.take(idx)._asdict()
            batch["ref_chosen"], batch["ref_rejected"] = ref[idx, 0], ref[idx, 1]
            metrics, acc = self._grad_fn(self.params, self.opt_state, batch, acc,
                                         np.float32(1.0 / num_micro))
            micro_metrics.append(metrics)
        micro_metrics = jax.device_get(micro_metrics)
        self._keep_base()
        lr = float(self.updater.schedule(self.step))
        self.params, self.opt_state, report = self.updater.apply(self.params, acc,
                                                                 self.opt_state)
        jax.block_until_ready(self.params)
        step_time = time.perf_counter() - t0
        tokens = enc.take(order).num_tokens()
        record = {"kind": "train", "step": self.step,
                  **{k: float(np.mean([m[k] for m in micro_metrics]))
                     for k in micro_metrics[0]},
                  "grad_norm": float(report.grad_norm), "skipped": bool(report.skipped),
                  "learning_rate": lr, "step_time": step_time, "tokens": tokens,
                  "compile_time": compile_seconds() - c0,
                  # steady-state speed: the step's compilation is reported on its own
                  "tokens_per_s": tokens / max(step_time - (compile_seconds() - c0), 1e-9)}
        peak = peak_memory_bytes()
        if peak is not None:
            record["peak_memory_bytes"] = peak
        self.step += 1
        return record

    def _evaluate_encoded(self, enc: EncodedPairs, ref: np.ndarray) -> dict[str, Any]:
        logps = self._score(self.params, enc)
        batch = {"ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1],
                 "chosen_mask": enc.chosen_mask, "rejected_mask": enc.rejected_mask}
        loss, metrics = self._loss_fn(logps[:, 0], logps[:, 1], batch)
        return {"kind": "eval", "step": self.step, "eval_loss": float(loss),
                "eval_accuracy": float(metrics["rewards/accuracies"]),
                **{f"eval_{k}": float(v) for k, v in metrics.items()
                   if k != "rewards/accuracies"},
                "eval_pairs": enc.num_pairs}

    def _eval_subset(self, pairs: Sequence[Pair]) -> Sequence[Pair]:
        limit = self.cfg.eval_limit
        return pairs if limit is None else pairs[:limit]

    def evaluate(self, pairs: Sequence[Pair]) -> dict[str, Any]:
        """DPO loss, reward accuracy and margins on (the first ``eval_limit`` of) ``pairs``."""
        enc = self.encode(self._eval_subset(pairs))
        ref = np.stack(self.reference_logprobs(enc), axis=1)
        return self._evaluate_encoded(enc, ref)

    # ------------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict[str, Any]:
        return {"data_position": np.asarray(self.step * self.cfg.batch_size, np.int64)}

    def _load_extra_state(self, tree: dict[str, Any]) -> None:
        del tree
        self._keep_base()  # the params are about to stop being the base

    # ------------------------------------------------------------------ the run

    def train(self, pairs: Sequence[Pair], eval_pairs: Sequence[Pair] | None = None, *,
              resume: bool = False, progress: bool = True, overwrite: bool = False,
              final_model_dir: str | os.PathLike | None = None,
              run_info: dict[str, Any] | None = None, writer: Any = None) -> dict[str, Any]:
        """Runs ``config.steps`` steps (continuing from a checkpoint with ``resume``).

        Writes ``metrics.jsonl``, checkpoints, ``curves.png``, (with eval pairs)
        ``final_eval.json``, the final model (with ``final_model_dir``) and
        ``finished.json`` under ``out_dir`` (see :class:`PolicyRun` for the run's life
        cycle); returns the final evaluation (or the last train record). ``run_info``
        (e.g. the model's name) joins the run's identity. ``writer`` (a
        :mod:`sparsejax.metric_writers` writer, e.g. TensorBoard) also receives every
        train and eval record; the caller closes it.
        """
        cfg = self.cfg
        from sparsejax.trainers.policy_run import tree_digest  # pylint: disable=g-import-not-at-top
        enc = self.encode(pairs)
        self.run_info = run_info
        if self.open_run(resume, overwrite=overwrite, data=tree_digest(tuple(enc))) is not None:
            return self.finished_result()
        eval_enc = self.encode(self._eval_subset(eval_pairs)) if eval_pairs else None
        # Reference log-probs first, while a dense run's params are still the base.
        needed = visited_pairs(enc.num_pairs, cfg.steps, cfg.batch_size, cfg.seed)
        ref = np.stack(self.reference_logprobs(enc, needed=needed), axis=1)
        eval_ref = (np.stack(self.reference_logprobs(eval_enc), axis=1)
                    if eval_enc is not None else None)
        restored = self.restore(resume)
        log = self.metrics_log(restored, writer)
        log.write({"kind": "config", "step": -1,
                   "trainable": self.updater.num_trainable(self.params),
                   "optimizer_state_bytes": tree_bytes(self.opt_state),
                   "resumed_from": restored, "train_pairs": enc.num_pairs,
                   "prompt_width": enc.prompt_tokens.shape[1],
                   "completion_width": enc.chosen_tokens.shape[1],
                   **vars(cfg), **{f"sparse_{k}": v for k, v in vars(self.sparse_cfg).items()}})
        bar = tqdm(total=cfg.steps, initial=self.step, desc="DPO", disable=not progress)
        evaluate = ((lambda: self._evaluate_encoded(eval_enc, eval_ref))
                    if eval_enc is not None else None)

        def on_step(rec):
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['rewards/accuracies']:.2f}",
                            margin=f"{rec['rewards/margins']:.3f}")

        def plot(rows, path):
            # plot_curves overlays eval points on the panel named "accuracy".
            rows = [{**r, "accuracy": r["rewards/accuracies"]} if r.get("kind") == "train"
                    else r for r in rows]
            plot_curves(rows, path, keys=("loss", "rewards/margins", "accuracy"),
                        eval_key="eval_accuracy",
                        title=f"DPO ({cfg.loss_type}), "
                              f"{self.updater.num_trainable(self.params):,} trainable")

        last = self.run_steps(lambda: self.train_step(enc, ref), evaluate, log, on_step)
        bar.close()
        final = self.finish(log, evaluate, plot, final_model_dir)
        return last if final is None else final

    def save_model(self, folder: str | os.PathLike) -> str:
        """The current policy in Hugging Face format (safetensors + config + tokenizer)."""
        return self.updater.save_model(folder, self.graphdef, self.params, self.tokenizer)

