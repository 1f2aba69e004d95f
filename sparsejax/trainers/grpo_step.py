"""One GRPO micro-batch as a pure function: the loss, its metrics and the gradient of
what trains.

The trainer jits it with its model, trainable and config bound
(:class:`~sparsejax.trainers.grpo.GRPOTrainer`); planners and benchmarks call the same
function (``experiments/memory_plan.py`` compiles it on abstract shapes).
"""

from __future__ import annotations

from typing import Any

import jax

from sparsejax import losses
from sparsejax.config import GRPOConfig
from sparsejax.models.logprobs import completion_logprobs
from sparsejax.trainable.base import Trainable
from sparsejax.types import PyTree


def micro_batch_grads(graphdef: Any, trainable: Trainable, config: GRPOConfig,
                      params: PyTree, opt_state: PyTree, batch: dict[str, jax.Array],
                      num_items: jax.Array) -> tuple[jax.Array, dict[str, jax.Array], PyTree]:
    """``(loss, metrics, grads)`` of one micro-batch (traceable).

    Args:
      graphdef: the decoder's ``nnx`` graph definition.
      trainable: what trains (its ``value_and_grad`` gives the gradient it accumulates).
      config: the run's GRPO settings (temperature, loss, clipping, KL, chunking).
      params, opt_state: the policy params and the optimizer state.
      batch: ``prompt_tokens``, ``prompt_mask`` ``[B, P]``; ``tokens``, ``mask`` ``[B, T]``;
        ``advantages`` ``[B]``; ``old_logps`` ``[B, T]`` (the sampling policy's, when a
        generation batch feeds several optimizer steps; on-policy without);
        ``ref_logps`` ``[B, T]`` when ``config.beta > 0``;
        ``truncated`` ``[B]`` (no stop token within the budget) when
        ``config.mask_truncated_completions``.
      num_items: the ``dapo`` / ``cispo`` / ``vespo`` losses' denominator (completion
        tokens per micro-batch).
    """

    def loss_fn(p):
        logps, entropies = completion_logprobs(
            graphdef, p, batch["prompt_tokens"], batch["prompt_mask"], batch["tokens"],
            batch["mask"], temperature=config.temperature,
            chunk_size=config.logprob_chunk_size, return_entropy=True)
        return losses.grpo_loss(
            logps, batch.get("old_logps"), batch["advantages"], batch["mask"],
            ref_logps=batch.get("ref_logps"), beta=config.beta,
            use_bias_correction_kl=config.kl_bias_correction,
            epsilon=config.epsilon, epsilon_high=config.epsilon_high, delta=config.delta,
            loss_type=config.loss_type,
            importance_sampling_level=config.importance_sampling_level,
            max_completion_length=config.max_new_tokens, num_items_in_batch=num_items,
            entropies=entropies, top_entropy_quantile=config.top_entropy_quantile,
            entropy_coef=config.entropy_coef,
            truncated=batch.get("truncated") if config.mask_truncated_completions else None,
            sapo_temperature_pos=config.sapo_temperature_pos,
            sapo_temperature_neg=config.sapo_temperature_neg,
            vespo_k_pos=config.vespo_k_pos, vespo_lambda_pos=config.vespo_lambda_pos,
            vespo_k_neg=config.vespo_k_neg, vespo_lambda_neg=config.vespo_lambda_neg)

    (loss, metrics), grads = trainable.value_and_grad(loss_fn, params, opt_state)
    return loss, metrics, grads


def accumulate_micro_batch(graphdef: Any, trainable: Trainable, config: GRPOConfig,
                           acc: PyTree, params: PyTree, opt_state: PyTree,
                           batch: dict[str, jax.Array], num_items: jax.Array
                           ) -> tuple[jax.Array, dict[str, jax.Array], PyTree]:
    """:func:`micro_batch_grads` with the gradient added to the accumulator ``acc``:
    ``(loss, metrics, acc + grads)``. Jitted with ``acc`` donated, the sum is written
    into the accumulator's buffers, so no second gradient-sized buffer outlives the
    call (the same float32 additions, in the same order, as summing outside)."""
    loss, metrics, grads = micro_batch_grads(graphdef, trainable, config, params, opt_state,
                                             batch, num_items)
    return loss, metrics, jax.tree.map(jax.numpy.add, acc, grads)
