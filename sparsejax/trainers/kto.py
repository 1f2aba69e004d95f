"""KTO (Ethayarajh et al., arXiv 2402.01306) with sparse or full finetuning (or LoRA).

One step::

    examples of step t (each prompt, one completion, a desirable/undesirable label)
      --> per micro-batch: summed completion log-probs of the policy (differentiated)
          and, for ``kto``, of the mismatched pairs (no gradient: the KL reference point)
      --> kto_loss against the reference log-probs (precomputed once)
      --> gradients at the active entries (micro-batched, accumulated)
      --> fused sparse AdamW step (or dense optax.adamw) --> next step

Data (:mod:`sparsejax.trainers.kto_data`): ``prompt``, ``completion``, ``label``;
preference pairs are unpaired. Prompts and completions are encoded as DPO's are (one
width per dataset: nothing recompiles).

The KL reference point of a micro-batch is estimated from its mismatched pairs: the
completions rotate by one within the micro-batch (each prompt with the previous
example's completion), so the mismatched completions are the micro-batch's own, as the
paper asks. The step's examples are a slice of a seeded per-epoch permutation (a
function of the step: resumable), so the pairs change from epoch to epoch.

The reference is the base model, kept as the trainable keeps it (see
:mod:`sparsejax.trainers.dpo`): before the first step the run scores, in fixed chunks, the
examples it will visit and the mismatched pairs of every step it will take (those
depend on the step's order), so a value never depends on how long the run is and a
resumed run gets bit-identical values. Evaluation takes the eval examples in order, in
chunks of ``micro_batch_size`` (each its own KL estimate); its loss is the mean over the
examples, its metrics the means over the chunks.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from sparsejax.config import KTOConfig, TrainableConfig
from sparsejax.data.order import prompt_order
from sparsejax.losses.kto import kto_loss
from sparsejax.models.logprobs import completion_logprobs
from sparsejax.runs.reporting import plot_curves
from sparsejax.runs.run import tree_digest
from sparsejax.trainable import reference as reference_lib
from sparsejax.trainable.base import Trainable
from sparsejax.trainers.dpo_data import visited_pairs
from sparsejax.trainers.kto_data import (
    EncodedExamples,
    Example,
    encode_examples,
    is_paired,
    mismatched_index,
    unpair,
)
from sparsejax.trainers.offline import OfflineRun
from sparsejax.types import PyTree


class KTOTrainer(OfflineRun):
    """Trains a :class:`~sparsejax.models.Decoder` with the KTO loss
    (:func:`sparsejax.losses.kto.kto_loss`) on labelled, unpaired examples.

    Takes the arguments of :class:`~sparsejax.trainers.offline.OfflineRun` with a
    :class:`KTOConfig`.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: PyTree, tokenizer: Any,
                 config: KTOConfig, trainable_config: TrainableConfig,
                 out_dir: str | os.PathLike, mask: PyTree | None = None, *,
                 chat_template: bool | None = None, trainable: Trainable | None = None,
                 mesh: Any = None):
        super().__init__(graphdef, params, tokenizer, config, trainable_config, out_dir, mask,
                         chat_template=chat_template, trainable=trainable, mesh=mesh)
        self._logps_fn = jax.jit(self._sequence_logps)
        self._loss_fn = jax.jit(self._loss)

    # ------------------------------------------------------------------ pieces

    def encode(self, examples: Sequence[Example]) -> EncodedExamples:
        """Tokenized, truncated and padded examples (preference pairs unpaired first)."""
        if is_paired(examples):
            examples = unpair(examples)
        return encode_examples(self.tokenizer, examples,
                               max_prompt_length=self.cfg.max_prompt_length,
                               max_completion_length=self.cfg.max_completion_length,
                               chat_template=self.chat_template)

    def _as_encoded(self, examples: Sequence[Example] | EncodedExamples) -> EncodedExamples:
        return examples if isinstance(examples, EncodedExamples) else self.encode(examples)

    def _sequence_logps(self, params: PyTree, batch: Mapping[str, jax.Array]) -> jax.Array:
        """``[B]`` summed completion log-probs of ``batch``'s (prompt, completion) rows."""
        return completion_logprobs(self.graphdef, params, batch["prompt_tokens"],
                                   batch["prompt_mask"], batch["completion_tokens"],
                                   batch["completion_mask"],
                                   chunk_size=self.cfg.logprob_chunk_size).sum(-1)

    def _loss(self, logps, ref_logps, label, policy_kl_logps=None, ref_kl_logps=None):
        return kto_loss(logps, ref_logps, label, policy_kl_logps=policy_kl_logps,
                        ref_kl_logps=ref_kl_logps, **self.cfg.loss_options())

    def _batch_loss(self, params: PyTree, batch: Mapping[str, jax.Array]):
        return self._loss(self._sequence_logps(params, batch), batch["ref_logps"],
                          batch["label"], batch.get("policy_kl_logps"),
                          batch.get("ref_kl_logps"))

    def _micro_batch_grads(self, params, opt_state, batch, acc, weight):
        if self.cfg.uses_kl:  # the current policy on the mismatched pairs, no gradient
            kl_batch = {**batch, "completion_tokens": batch["kl_tokens"],
                        "completion_mask": batch["kl_mask"]}
            batch = {**batch, "policy_kl_logps": jax.lax.stop_gradient(
                self._sequence_logps(params, kl_batch))}
        return super()._micro_batch_grads(params, opt_state, batch, acc, weight)

    def sequence_logprobs(self, examples: Sequence[Example] | EncodedExamples) -> np.ndarray:
        """Summed completion log-probs ``[N]`` under the policy."""
        return self._score(self.params, self._as_encoded(examples))

    def reference_logprobs(self, examples: Sequence[Example] | EncodedExamples, *,
                           needed: np.ndarray | None = None) -> np.ndarray:
        """Summed completion log-probs ``[N]`` under the base model (with ``needed``, only
        the chunks holding needed examples; the rest are NaN)."""
        return self._score_reference(self._as_encoded(examples), needed)

    def step_order(self, num_examples: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(examples, mismatched completions)`` ``[batch_size]`` of ``step``."""
        order = prompt_order(num_examples, step, self.cfg.batch_size, self.cfg.seed)
        return order, mismatched_index(order, self.cfg.micro_batch_size)

    def reference_kl_logprobs(self, enc: EncodedExamples, steps: Sequence[int]
                              ) -> np.ndarray | None:
        """``[max(steps) + 1, batch_size]`` reference log-probs of the mismatched pairs of
        ``steps`` (rows of other steps NaN), in each step's order; None when the loss
        estimates no KL."""
        if not self.cfg.uses_kl or not len(steps):
            return None
        out = np.full((max(steps) + 1, self.cfg.batch_size), np.nan, np.float32)
        with reference_lib.scoring(self, self.base_policy) as params:
            for step in steps:
                out[step] = self._score(params, enc.recombined(*self.step_order(
                    enc.num_examples, step)))
        return out

    # ------------------------------------------------------------------ steps

    def train_step(self, enc: EncodedExamples, ref: np.ndarray,
                   ref_kl: np.ndarray | None) -> dict[str, Any]:
        """One KTO step on the examples of ``self.step``: ``ref [N]`` the reference's log-probs
        of the examples, ``ref_kl`` :meth:`reference_kl_logprobs` (holding this step)."""
        cfg, mb = self.cfg, self.cfg.micro_batch_size
        order, kl_order = self.step_order(enc.num_examples, self.step)
        batches = []
        for s in range(0, cfg.batch_size, mb):
            idx, kl_idx = order[s:s + mb], kl_order[s:s + mb]
            batch = {**enc.take(idx)._asdict(), "ref_logps": ref[idx]}
            if cfg.uses_kl:
                batch.update(kl_tokens=enc.completion_tokens[kl_idx],
                             kl_mask=enc.completion_mask[kl_idx],
                             ref_kl_logps=ref_kl[self.step, s:s + mb])
            batches.append(batch)
        tokens = enc.take(order).num_tokens()
        if cfg.uses_kl:
            tokens += enc.recombined(order, kl_order).num_tokens()
        return self._run_step(batches, tokens)

    def _combine_metrics(self, micro_metrics: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """Means over the micro-batches that have the metric (a micro-batch with no
        desirable example has no ``rewards/chosen``); a metric none has is left out."""
        out = {}
        for key in micro_metrics[0]:
            values = np.asarray([m[key] for m in micro_metrics], np.float64)
            if key == "loss" or not np.isnan(values).all():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    out[key] = float(values.mean() if key == "loss" else np.nanmean(values))
        return out

    def _evaluate_encoded(self, enc: EncodedExamples, ref: np.ndarray,
                          ref_kl: np.ndarray | None) -> dict[str, Any]:
        n, mb = enc.num_examples, self.cfg.micro_batch_size
        logps = self._score(self.params, enc)
        kl_logps = (self._score(self.params, enc.recombined(*eval_order(n, mb)))
                    if self.cfg.uses_kl else None)
        losses, metrics = [], []
        for s in range(0, n, mb):
            g = slice(s, min(s + mb, n))
            loss, m = self._loss_fn(logps[g], ref[g], enc.label[g],
                                    None if kl_logps is None else kl_logps[g],
                                    None if ref_kl is None else ref_kl[g])
            losses.append(float(loss) * (g.stop - g.start))
            metrics.append({"loss": loss, **m})
        combined = self._combine_metrics(jax.device_get(metrics))
        combined.pop("loss")
        return {"kind": "eval", "step": self.step, "eval_loss": sum(losses) / n,
                **{f"eval_{k}": v for k, v in combined.items()}, "eval_examples": n}

    def _eval_reference(self, enc: EncodedExamples) -> tuple[np.ndarray, np.ndarray | None]:
        ref = self.reference_logprobs(enc)
        ref_kl = (self.reference_logprobs(enc.recombined(*eval_order(enc.num_examples,
                                                                     self.cfg.micro_batch_size)))
                  if self.cfg.uses_kl else None)
        return ref, ref_kl

    def evaluate(self, examples: Sequence[Example]) -> dict[str, Any]:
        """KTO loss, rewards and KL estimate on (the first ``eval_limit`` of) ``examples``."""
        enc = self.encode(self._eval_subset(examples))
        return self._evaluate_encoded(enc, *self._eval_reference(enc))

    # ------------------------------------------------------------------ the run

    def train(self, examples: Sequence[Example], eval_examples: Sequence[Example] | None = None,
              *, resume: bool = False, progress: bool = True, overwrite: bool = False,
              final_model_dir: str | os.PathLike | None = None,
              run_info: dict[str, Any] | None = None, writer: Any = None) -> dict[str, Any]:
        """Runs ``config.steps`` steps (continuing from a checkpoint with ``resume``); the
        outputs and arguments are :meth:`DPOTrainer.train
        <sparsejax.trainers.dpo.DPOTrainer.train>`'s."""
        cfg = self.cfg
        enc = self.encode(examples)

        def prepare():
            eval_enc = (self.encode(self._eval_subset(eval_examples)) if eval_examples
                        else None)
            # Reference log-probs first, while a dense run's params are still the base.
            needed = visited_pairs(enc.num_examples, cfg.steps, cfg.batch_size, cfg.seed)
            ref = self.reference_logprobs(enc, needed=needed)
            ref_kl = self.reference_kl_logprobs(enc, range(cfg.steps))
            evaluate = None
            if eval_enc is not None:
                eval_ref = self._eval_reference(eval_enc)
                evaluate = lambda: self._evaluate_encoded(eval_enc, *eval_ref)
            record = {"train_examples": enc.num_examples,
                      "desirable_examples": int(enc.label.sum()),
                      "prompt_width": enc.prompt_tokens.shape[1],
                      "completion_width": enc.completion_tokens.shape[1]}
            return lambda: self.train_step(enc, ref, ref_kl), evaluate, record

        return self.run_loop(tree_digest(tuple(enc)), prepare, resume=resume,
                             overwrite=overwrite, progress=progress,
                             final_model_dir=final_model_dir, run_info=run_info, writer=writer)

    name = "KTO"

    def progress_postfix(self, record: dict[str, Any]) -> dict[str, str]:
        out = {"loss": f"{record['loss']:.4f}", "kl": f"{record['kl']:.3f}"}
        if "rewards/margins" in record:
            out["margin"] = f"{record['rewards/margins']:.3f}"
        return out

    def plot(self, rows: list[dict[str, Any]], path: str) -> None:
        plot_curves(rows, path, keys=("loss", "rewards/margins", "kl"),
                    title=f"KTO ({self.cfg.loss_type}), "
                          f"{self.trainable.num_trainable(self.params):,} trainable")


def eval_order(n: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """``(examples, mismatched completions)`` of an evaluation: the examples in order, the
    completions rotated within each chunk of ``group``."""
    order = np.arange(n)
    return order, mismatched_index(order, group)
