"""DPO (Rafailov et al., arXiv 2305.18290) and its variants with sparse or full finetuning.

One step::

    pairs of step t --tokenize/pad (fixed widths)--> prompt + chosen / rejected tokens
      --> per-token log-probs (policy; chosen and rejected in one forward pass)
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
later (:meth:`DPOTrainer.evaluate` after training). ``reference_free`` uses zeros, as do
runs whose losses all do without a reference (``sft``, ``simpo``, ``orpo``). With
``ld_alpha`` the reference's sums are LD-DPO's weighted sums (the same reduction as the
policy's).

The loss (:func:`sparsejax.losses.dpo_loss`) gets the policy's per-token log-probs and
completion masks, so the length-aware losses (IPO, ``sigmoid_norm``, SimPO, ORPO, the
``sft`` term), LD-DPO and WPO's weights (``use_weighting``: a second, gradient-free
projection of the same hidden states, :mod:`sparsejax.trainers.dpo_logps`) all apply; a
combination of losses is one program. Evaluation computes the loss of all eval pairs at
once from their per-token log-probs.

Everything a step needs is a function of the step number (pair order) and the
checkpoint, so ``resume`` continues exactly as an uninterrupted run would. A sparse
run's checkpoint holds the ``k`` trained values and the optimizer state; the rest of
the model comes from the base weights the run was started from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.config import DPOConfig, TrainableConfig
from sparsejax.data.order import prompt_order
from sparsejax.losses.dpo import dpo_loss
from sparsejax.losses.dpo_family import ld_sequence_logps
from sparsejax.runs.reporting import plot_curves
from sparsejax.runs.run import tree_digest
from sparsejax.trainable.base import Trainable
from sparsejax.trainers.dpo_data import (  # noqa: F401
    EncodedPairs,
    Pair,
    completion_text,
    encode_pairs,
    right_pad,
    split_pair,
    visited_pairs,
)
from sparsejax.trainers.dpo_logps import pair_token_logps
from sparsejax.trainers.offline import OfflineRun
from sparsejax.types import PyTree

# ---------------------------------------------------------------------- trainer


class DPOTrainer(OfflineRun):
    """Trains a :class:`~sparsejax.models.Decoder` with a DPO-family loss (or a weighted
    sum of several; see :func:`sparsejax.losses.dpo_loss`).

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
        super().__init__(graphdef, params, tokenizer, config, trainable_config, out_dir, mask,
                         chat_template=chat_template, trainable=trainable, mesh=mesh)
        self._logps_fn = jax.jit(self._sequence_logps)
        self._tokens_fn = jax.jit(self._token_logps)
        self._loss_fn = jax.jit(self._loss)

    # ------------------------------------------------------------------ pieces

    def encode(self, pairs: Sequence[Pair]) -> EncodedPairs:
        """Tokenized, truncated and padded pairs (see :func:`encode_pairs`)."""
        return encode_pairs(self.tokenizer, pairs, max_prompt_length=self.cfg.max_prompt_length,
                            max_completion_length=self.cfg.max_completion_length,
                            chat_template=self.chat_template)

    def _token_logps(self, params: PyTree, batch: Mapping[str, jax.Array]
                     ) -> dict[str, jax.Array]:
        """Per-token completion log-probs ``{"chosen", "rejected"}`` ``[B, C]`` (with
        ``use_weighting`` also WPO's ``"chosen_sq"``, ``"rejected_sq"``), one forward pass."""
        return pair_token_logps(self.graphdef, params, batch,
                                chunk_size=self.cfg.logprob_chunk_size,
                                with_sq=self.cfg.use_weighting)

    def _sequence_logps(self, params: PyTree, batch: Mapping[str, jax.Array]) -> jax.Array:
        """``[B, 2]`` (chosen, rejected) summed completion log-probs (LD-DPO's weighted
        sums with ``ld_alpha``), one forward pass."""
        tokens = pair_token_logps(self.graphdef, params, batch,
                                  chunk_size=self.cfg.logprob_chunk_size)
        chosen, rejected = ld_sequence_logps(tokens["chosen"], tokens["rejected"],
                                             batch["chosen_mask"], batch["rejected_mask"],
                                             self.cfg.ld_alpha)
        return jnp.stack([chosen, rejected], axis=1)

    def _loss(self, tokens: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
        """:func:`dpo_loss` of per-token log-probs against ``batch``'s reference sums."""
        return dpo_loss(tokens["chosen"], tokens["rejected"], batch["ref_chosen"],
                        batch["ref_rejected"], chosen_mask=batch["chosen_mask"],
                        rejected_mask=batch["rejected_mask"],
                        chosen_log_sum_sq_probs=tokens.get("chosen_sq"),
                        rejected_log_sum_sq_probs=tokens.get("rejected_sq"),
                        **self.cfg.loss_options())

    def _batch_loss(self, params: PyTree, batch: Mapping[str, jax.Array]):
        return self._loss(self._token_logps(params, batch), batch)

    def _as_encoded(self, pairs: Sequence[Pair] | EncodedPairs) -> EncodedPairs:
        return pairs if isinstance(pairs, EncodedPairs) else self.encode(pairs)

    def sequence_logprobs(self, pairs: Sequence[Pair] | EncodedPairs
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Summed completion log-probs ``([N] chosen, [N] rejected)`` under the policy
        (LD-DPO's weighted sums with ``ld_alpha``)."""
        out = self._score(self.params, self._as_encoded(pairs))
        return out[:, 0], out[:, 1]

    def reference_logprobs(self, pairs: Sequence[Pair] | EncodedPairs, *,
                           needed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Summed completion log-probs ``([N] chosen, [N] rejected)`` under the base model.

        As the variant keeps the base policy (:mod:`sparsejax.trainable.reference`):
        sparse runs swap the base values of the active entries in and back out (in
        place); dense runs use the params while untouched, else the host copy. Zeros
        for ``reference_free`` (or losses that use no reference). LD-DPO's weighted sums
        with ``ld_alpha``. With ``needed``, only chunks holding needed pairs are scored
        (the rest are NaN).
        """
        enc = self._as_encoded(pairs)
        if not self.cfg.needs_reference:
            zeros = np.zeros(enc.num_pairs, np.float32)
            return zeros, zeros.copy()
        out = self._score_reference(enc, needed)
        return out[:, 0], out[:, 1]

    # ------------------------------------------------------------------ steps

    def train_step(self, enc: EncodedPairs, ref: np.ndarray) -> dict[str, Any]:
        """One DPO step on the pairs of ``self.step``; ``ref`` is ``[N, 2]``."""
        cfg = self.cfg
        order = prompt_order(enc.num_pairs, self.step, cfg.batch_size, cfg.seed)
        batches = []
        for s in range(0, cfg.batch_size, cfg.micro_batch_size):
            idx = order[s:s + cfg.micro_batch_size]
            batch = enc.take(idx)._asdict()
            batch["ref_chosen"], batch["ref_rejected"] = ref[idx, 0], ref[idx, 1]
            batches.append(batch)
        return self._run_step(batches, enc.take(order).num_tokens())

    def _evaluate_encoded(self, enc: EncodedPairs, ref: np.ndarray) -> dict[str, Any]:
        tokens = self._score(self.params, enc, fn=self._tokens_fn)
        batch = {"ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1],
                 "chosen_mask": enc.chosen_mask, "rejected_mask": enc.rejected_mask}
        loss, metrics = self._loss_fn(tokens, batch)
        return {"kind": "eval", "step": self.step, "eval_loss": float(loss),
                "eval_accuracy": float(metrics["rewards/accuracies"]),
                **{f"eval_{k}": float(v) for k, v in metrics.items()
                   if k != "rewards/accuracies"},
                "eval_pairs": enc.num_pairs}

    def evaluate(self, pairs: Sequence[Pair]) -> dict[str, Any]:
        """DPO loss, reward accuracy and margins on (the first ``eval_limit`` of) ``pairs``."""
        enc = self.encode(self._eval_subset(pairs))
        ref = np.stack(self.reference_logprobs(enc), axis=1)
        return self._evaluate_encoded(enc, ref)

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
                    title=f"DPO ({'+'.join(self.cfg.loss_type)}), "
                          f"{self.trainable.num_trainable(self.params):,} trainable")
