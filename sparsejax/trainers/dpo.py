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
entries into the params in place (:meth:`SparseEntries.swap_active`), scores and swaps back; no
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.config import DPOConfig, TrainableConfig
from sparsejax.data.order import prompt_order
from sparsejax.losses.dpo import dpo_loss
from sparsejax.models.decoder import reconfigure
from sparsejax.models.logprobs import completion_logprobs
from sparsejax.parallel import sharding as sharding_lib
from sparsejax.parallel.distributed import host_array, to_host
from sparsejax.runs import checkpoint as ckpt_lib
from sparsejax.runs.reporting import compile_seconds, peak_memory_bytes, plot_curves
from sparsejax.runs.run import PolicyRun, tree_digest
from sparsejax.trainable import reference as reference_lib
from sparsejax.trainable.base import Trainable, trainer_mesh
from sparsejax.trainable.build import build_trainable
from sparsejax.trainers.dpo_data import (  # noqa: F401
    EncodedPairs,
    Pair,
    completion_text,
    encode_pairs,
    right_pad,
    split_pair,
    visited_pairs,
)
from sparsejax.types import PyTree

# ---------------------------------------------------------------------- trainer


class DPOTrainer(PolicyRun):
    """Trains a :class:`~sparsejax.models.Decoder` with DPO (sigmoid, IPO, hinge, robust).

    Args:
        graphdef, params: ``nnx.split`` of the policy; these are also the reference.
        tokenizer: a transformers tokenizer (encoding pairs, saving the model).
        config, trainable_config: the run's :class:`DPOConfig` and :class:`TrainableConfig`.
        out_dir: where metrics, checkpoints, plots and the final evaluation go.
        mask: a mask to train (default: built from ``trainable_config``).
        trainable: what trains, built beforehand (:mod:`sparsejax.trainable`; e.g. a LoRA
            adapter); default: built from ``trainable_config`` (and ``mask``).
        chat_template: format prompts with the chat template (None: if the tokenizer
            has one).
        mesh: a mesh spec or :class:`jax.sharding.Mesh` (default ``config.mesh``): params,
            mask, optimizer state and reference values are placed by
            :mod:`sparsejax.parallel.sharding`, micro-batches split along the batch.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: PyTree, tokenizer: Any,
                 config: DPOConfig, trainable_config: TrainableConfig,
                 out_dir: str | os.PathLike, mask: PyTree | None = None, *,
                 chat_template: bool | None = None, trainable: Trainable | None = None,
                 mesh: Any = None):
        self.graphdef, self.params = graphdef, params
        self.graphdef = reconfigure(graphdef, params, remat=config.remat)
        self.tokenizer = tokenizer
        self.cfg, self.trainable_cfg = config, trainable_config
        self.chat_template = chat_template
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.mesh = trainer_mesh(mesh, config.mesh, trainable)
        if self.mesh is not None:
            sharding_lib.check_batch("micro_batch_size", config.micro_batch_size, self.mesh)
        # What trains: given (e.g. a sparsejax.trainable.LoraAdapter) or built from the config.
        self.trainable = (build_trainable(trainable_config, params, mask=mask, mesh=self.mesh)
                          if trainable is None else trainable)
        self.params = params = self.trainable.policy_params(params)
        self.opt_state = self.trainable.init(params)
        # The reference, kept as the variant keeps it: the base values of the k trained
        # entries, or (full finetuning) the params themselves until they first change,
        # then a host copy.
        self.base_policy = (None if config.reference_free else
                            self.trainable.base_policy(params, self.opt_state, on_host=True))
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

        (loss, metrics), grads = self.trainable.value_and_grad(loss_fn, params, opt_state)
        acc = jax.tree.map(lambda a, g: a + (weight * g).astype(a.dtype), acc, grads)
        return {"loss": loss, **metrics}, acc

    def _zeros_like_compressed(self, params, opt_state):
        """A zero gradient accumulator (the compressed gradient's shapes)."""
        return jax.tree.map(jnp.zeros_like, self.trainable.compress(params, opt_state))

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
            chosen, rejected = self._logps_fn(
                params, sharding_lib.put_batch(enc.take(padded)._asdict(), self.mesh))
            out[idx, 0] = host_array(chosen)[:len(idx)]
            out[idx, 1] = host_array(rejected)[:len(idx)]
        return out

    def _keep_base(self) -> None:
        """Before the params first change (the base policy keeps what it needs)."""
        if self.base_policy is not None:
            self.base_policy.before_change(self.params)

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

        As the variant keeps the base policy (:mod:`sparsejax.trainable.reference`):
        sparse runs swap the base values of the active entries in and back out (in
        place); dense runs use the params while untouched, else the host copy. Zeros
        for ``reference_free``. With ``needed``, only chunks holding needed pairs are
        scored (the rest are NaN).
        """
        enc = self._as_encoded(pairs)
        if self.cfg.reference_free:
            zeros = np.zeros(enc.num_pairs, np.float32)
            return zeros, zeros.copy()
        with reference_lib.scoring(self, self.base_policy) as params:
            out = self._score(params, enc, needed)
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
            batch = sharding_lib.put_batch(batch, self.mesh)
            metrics, acc = self._grad_fn(self.params, self.opt_state, batch, acc,
                                         np.float32(1.0 / num_micro))
            micro_metrics.append(metrics)
        micro_metrics = to_host(micro_metrics)
        self._keep_base()
        lr = float(self.trainable.schedule(self.step))
        self.params, self.opt_state, report = self.trainable.apply(self.params, acc,
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
        :mod:`sparsejax.runs.metric_writers` writer, e.g. TensorBoard) also receives every
        train and eval record; the caller closes it.
        """
        cfg = self.cfg
        enc = self.encode(pairs)

        def prepare():
            eval_enc = self.encode(self._eval_subset(eval_pairs)) if eval_pairs else None
            # Reference log-probs first, while a dense run's params are still the base.
            needed = visited_pairs(enc.num_pairs, cfg.steps, cfg.batch_size, cfg.seed)
            ref = np.stack(self.reference_logprobs(enc, needed=needed), axis=1)
            evaluate = None
            if eval_enc is not None:
                eval_ref = np.stack(self.reference_logprobs(eval_enc), axis=1)
                evaluate = lambda: self._evaluate_encoded(eval_enc, eval_ref)
            record = {"train_pairs": enc.num_pairs, "prompt_width": enc.prompt_tokens.shape[1],
                      "completion_width": enc.chosen_tokens.shape[1]}
            return lambda: self.train_step(enc, ref), evaluate, record

        return self.run_loop(tree_digest(tuple(enc)), prepare, resume=resume,
                             overwrite=overwrite, progress=progress,
                             final_model_dir=final_model_dir, run_info=run_info, writer=writer)

    name = "DPO"

    def progress_postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4f}", "acc": f"{record['rewards/accuracies']:.2f}",
                "margin": f"{record['rewards/margins']:.3f}"}

    def plot(self, rows: list[dict[str, Any]], path: str) -> None:
        # plot_curves overlays eval points on the panel named "accuracy".
        rows = [{**r, "accuracy": r["rewards/accuracies"]} if r.get("kind") == "train" else r
                for r in rows]
        plot_curves(rows, path, keys=("loss", "rewards/margins", "accuracy"),
                    eval_key="eval_accuracy",
                    title=f"DPO ({self.cfg.loss_type}), "
                          f"{self.trainable.num_trainable(self.params):,} trainable")

    def save_model(self, folder: str | os.PathLike) -> str:
        """The current policy in Hugging Face format (safetensors + config + tokenizer)."""
        return self.trainable.save_model(folder, self.graphdef, self.params, self.tokenizer)

