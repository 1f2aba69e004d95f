"""The GRPO family of policy-gradient losses, as pure functions of per-token log-probs.

Notation (per completion ``i`` and completion token ``t``; ``m_{i,t}`` the completion mask,
with the rows of ``truncated`` completions zeroed when they are given):

* importance ratio. Token level (PPO, GRPO)::

      w_{i,t} = exp(logp_{i,t} - old_logp_{i,t})

  Sequence level (GSPO, Zheng et al., arXiv 2507.18071; TRL's ``importance_sampling_level=
  "sequence"``), one ratio per completion, the exponential of the mean log-ratio::

      w_i = exp( sum_t m_{i,t} (logp_{i,t} - old_logp_{i,t}) / max(1, sum_t m_{i,t}) )

  ``loss_type="rloo"`` uses the exponential of the *summed* log-ratio (the ratio of whole
  sequence likelihoods, TRL's ``RLOOTrainer``).

* per-token policy term ``pg`` (:mod:`sparsejax.losses.grpo_variants`): the clipped
  surrogate ``-min(w A, clip(w, 1 - eps_low, 1 + eps_high) A)`` (PPO / DAPO's decoupled
  ``epsilon_high``, arXiv 2503.14476; optionally INTELLECT-2's ``delta`` cap) for
  ``grpo | bnpo | dr_grpo | dapo | luspo | rloo``; CISPO's capped-ratio-weighted
  log-likelihood; SAPO's sigmoid gate; VESPO's Gamma weight of the sequence ratio.

* optional token masks on ``pg`` (the normalisation below is unchanged by them):
  - ``top_entropy_quantile = rho < 1``: keep only tokens whose entropy is at least the
    ``(1 - rho)`` quantile (linear interpolation, as ``torch.quantile``) of the entropies of
    all valid tokens in the batch ("Beyond the 80/20 Rule", Wang et al., arXiv 2506.01939;
    TRL's ``get_high_entropy_mask``);
  - ``ratio_mask_bounds = (low, high)``: drop tokens whose (detached) importance ratio lies
    outside ``[low, high]``, prime-rl's masked importance sampling (e.g. ``(0.125, 8.0)``).

* KL penalty to a reference policy with the k3 estimator (Schulman, "Approximating KL
  divergence"; DeepSeekMath arXiv 2402.03300)::

      kl_{i,t} = exp(ref_{i,t} - logp_{i,t}) - (ref_{i,t} - logp_{i,t}) - 1

  optionally multiplied by the importance ratio ``w`` (``use_bias_correction_kl``, the
  unbiased reverse-KL gradient of DeepSeek-V3.2, arXiv 2512.02556).
  ``l_{i,t} = pg_{i,t} + beta * kl_{i,t}``.

* aggregation (``loss_type``):
  - ``"grpo"``, ``"sapo"``: ``mean_i [ sum_t m l / max(1, sum_t m) ]`` (per-sequence token mean);
  - ``"bnpo"``:    ``sum_{i,t} m l / max(1, sum_{i,t} m)`` (token mean over the batch);
  - ``"dr_grpo"``: ``sum_{i,t} m l / (B * max_completion_length)`` (Dr. GRPO, arXiv 2503.20783);
  - ``"dapo"``, ``"cispo"``, ``"vespo"``: ``sum_{i,t} m l / max(1, num_items_in_batch)``,
    where ``num_items_in_batch`` defaults to ``sum_{i,t} m`` (DAPO's token-level loss); pass
    the token count of the whole generation batch to normalise micro-batches consistently;
  - ``"luspo"``: ``mean_i sum_t m l`` (LUSPO, arXiv 2602.05261: each sequence's loss scaled
    by its length; meant for ``importance_sampling_level="sequence"``);
  - ``"rloo"``: ``mean_i pg_i`` over the per-completion terms (TRL's ``RLOOTrainer``).

* entropy bonus ``entropy_coef = c``: ``loss - c * sum_{i,t} m' H / max(1, sum_{i,t} m')``
  with ``H`` the per-token entropies and ``m'`` the mask times the high-entropy mask (when
  ``top_entropy_quantile < 1``); the mean entropy, whatever the loss type's normalisation.

* ``truncated`` (TRL's ``mask_truncated_completions``): completions that used up the length
  budget without a stop token get mask 0 before anything above, so they leave every sum,
  token count and mean over tokens; means over completions (``grpo``, ``sapo``, ``luspo``,
  ``rloo``, ``dr_grpo``'s ``B``) still count them, as in TRL.

``loss_type="rloo"`` is TRL 1.16's ``RLOOTrainer`` loss: it is none of the GRPO loss
types (the summed log-ratio and the mean over completions of the clipped term give the same
gradient as ``luspo`` at ratio 1 but not off-policy, and a different loss value); TRL puts
RLOO's KL penalty into the reward, so here it needs ``beta=0``; ``delta`` and token masks
by entropy, which TRL's RLOO does not have, are refused.

These definitions follow TRL 1.16's ``GRPOTrainer._compute_loss`` and
``RLOOTrainer._compute_loss`` term by term (the tests check loss, gradient and logged
metrics against TRL's own code); ratio masking is not in TRL. Only ``logps`` carries
gradient, and ``entropies`` through the entropy bonus alone: ``old_logps``, ``ref_logps``
and ``advantages`` are treated as constants (``stop_gradient``).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from sparsejax.config.names import GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS
from sparsejax.losses import grpo_variants as variants

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "rloo"]
ImportanceSamplingLevel = Literal["token", "sequence"]


def masked_quantile(values: jax.Array, mask: jax.Array, q: float | jax.Array) -> jax.Array:
    """The ``q`` quantile of ``values[mask]`` with linear interpolation (``torch.quantile``'s default).

    Computed in float32, as TRL computes its entropy threshold. With ``n`` valid entries
    sorted ascending as ``v``, ``r = q (n - 1)``, the result is ``lerp(v[floor r], v[ceil r],
    r - floor r)``. Jit-able: the number of valid entries may be traced. Returns ``+inf`` when
    no entry is valid, so that a ``>=`` comparison against it selects nothing.
    """
    flat = jnp.ravel(values).astype(jnp.float32)
    valid = jnp.ravel(mask).astype(bool)
    ordered = jnp.sort(jnp.where(valid, flat, jnp.inf))
    n = jnp.sum(valid)
    rank = jnp.asarray(q, jnp.float32) * (n - 1).astype(jnp.float32)
    rank = jnp.maximum(rank, 0.0)
    below = jnp.floor(rank)
    weight = rank - below
    lo_idx = below.astype(jnp.int32)
    hi_idx = jnp.minimum(jnp.ceil(rank).astype(jnp.int32), jnp.maximum(n - 1, 0))
    lo = ordered[lo_idx]
    hi = ordered[hi_idx]
    # torch.lerp's two-branch formula, so that the threshold is bit-identical to torch's.
    interp = jnp.where(weight < 0.5, lo + weight * (hi - lo), hi - (hi - lo) * (1.0 - weight))
    interp = jnp.where(lo == hi, lo, interp)
    return jnp.where(n > 0, interp, jnp.inf)


def high_entropy_mask(entropies: jax.Array, mask: jax.Array, top_quantile: float) -> jax.Array:
    """Boolean mask of valid tokens whose entropy is in the top ``top_quantile`` of the batch.

    A token is kept iff it is valid and ``entropy >= quantile(entropies[mask], 1 - top_quantile)``
    ("Beyond the 80/20 Rule", arXiv 2506.01939; same semantics as TRL's
    ``GRPOTrainer.get_high_entropy_mask`` on one process). ``top_quantile=0`` keeps only the
    maximum-entropy token(s); ``top_quantile=1`` keeps every valid token.
    """
    if not 0.0 <= top_quantile <= 1.0:
        raise ValueError(f"top_quantile must lie in [0, 1], got {top_quantile}.")
    valid = jnp.asarray(mask).astype(bool)
    threshold = masked_quantile(entropies, valid, 1.0 - top_quantile)
    return (jnp.where(valid, entropies, 0) >= threshold) & valid



#: Loss types whose policy term is the clipped surrogate (they log the clip fractions).
CLIPPED_LOSS_TYPES = frozenset({"grpo", "bnpo", "dr_grpo", "dapo", "luspo", "rloo"})
#: Loss types normalised by the token count of the batch (``num_items_in_batch``).
TOKEN_COUNT_LOSS_TYPES = frozenset({"dapo", "cispo", "vespo"})


def _check_same_shape(name: str, x: jax.Array | None, shape: tuple[int, ...]) -> None:
    if x is not None and tuple(jnp.shape(x)) != shape:
        raise ValueError(f"{name} must have shape {shape} like logps, got {tuple(jnp.shape(x))}.")


def _check_number(name: str, value, *, positive: bool = False, signed: bool = False) -> None:
    """A finite number ``>= 0`` (``> 0`` if ``positive``; any sign if ``signed``); traced
    values pass unchecked."""
    if not isinstance(value, (int, float)):
        return
    # ``not value >= 0`` also refuses NaN, which every comparison would let through.
    ok = math.isfinite(value) and (signed or (value > 0 if positive else value >= 0))
    if not ok:
        bound = "" if signed else (" > 0" if positive else " >= 0")
        raise ValueError(f"{name} must be a finite number{bound}, got {value}.")


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array | None,
    advantages: jax.Array,
    completion_mask: jax.Array,
    *,
    ref_logps: jax.Array | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: GRPOLossType = "grpo",
    importance_sampling_level: ImportanceSamplingLevel = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | jax.Array | None = None,
    use_bias_correction_kl: bool = True,
    ratio_mask_bounds: tuple[float, float] | None = None,
    entropies: jax.Array | None = None,
    top_entropy_quantile: float = 1.0,
    entropy_coef: float = 0.0,
    truncated: jax.Array | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO-family policy-gradient loss (see the module docstring for the math).

    Args:
        logps: ``[B, T]`` log-probs of the sampled completion tokens under the policy being
            trained (the only differentiated input but for ``entropies``).
        old_logps: ``[B, T]`` log-probs under the policy that sampled (or, in PPO terms, the
            policy before this round of updates). ``None`` means on-policy:
            ``stop_gradient(logps)``, so the ratio is 1 but its gradient is not 0.
        advantages: ``[B]`` per-completion advantages (or ``[B, T]`` per-token; not for
            ``rloo``).
        completion_mask: ``[B, T]``, 1 for completion tokens to train on, 0 for padding.
        ref_logps: ``[B, T]`` reference-policy log-probs; required when ``beta != 0``.
        beta: KL coefficient (must be 0 for ``rloo``).
        epsilon: lower clip ``eps_low``; also the upper clip unless ``epsilon_high`` is set.
        epsilon_high: upper clip ``eps_high`` (DAPO's clip-higher, e.g. 0.28); for ``cispo``
            the cap of the ratio itself (TRL's reading; default ``epsilon``, ScaleRL uses 5).
        delta: cap of the unclipped ratio in the clipped surrogate (INTELLECT-2; e.g. 4).
        loss_type: ``grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo | rloo``.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO); ``rloo`` has its
            own sequence ratio and takes ``"token"`` (the default) only.
        max_completion_length: the ``dr_grpo`` denominator's length; defaults to ``T``.
        num_items_in_batch: the ``dapo`` / ``cispo`` / ``vespo`` denominator; defaults to
            the (truncation-masked) mask's sum.
        use_bias_correction_kl: multiply the per-token KL by the importance ratio (TRL's
            ``GRPOConfig.use_bias_correction_kl``, on by default there and here).
        ratio_mask_bounds: ``(low, high)``; zero the policy term of tokens (token level) or
            whole completions (sequence level) whose ratio is outside ``[low, high]``.
        entropies: ``[B, T]`` per-token entropies of the policy; required when
            ``top_entropy_quantile < 1`` or ``entropy_coef != 0``; their masked mean is
            reported when given. They carry gradient through the entropy bonus only.
        top_entropy_quantile: fraction ``rho`` of highest-entropy valid tokens that keep
            their policy term (1.0 keeps all; the paper recommends 0.2).
        entropy_coef: weight of the entropy bonus subtracted from the loss.
        truncated: ``[B]`` bool, completions to leave out of the loss (TRL's
            ``mask_truncated_completions``: those that hit the length budget without a stop
            token).
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for positive
            and non-positive advantages (> 0).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's Gamma weight
            exponent and decay for non-negative / negative advantages (>= 0).

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of scalar diagnostics, named as TRL
        logs them: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``,
        ``clip_ratio/region_mean`` for the clipped loss types (fraction of valid tokens, or
        of completions at sequence level, whose ratio is below ``1 - eps_low`` with negative
        advantage / above ``1 + eps_high`` with positive advantage / either),
        ``cispo_clip_ratio`` (ratio above the cap with positive advantage) and
        ``vespo/phi_seq_mean``; ``policy_loss`` (the loss before the entropy bonus) when
        ``entropy_coef != 0``; ``ratio/mean``; and when applicable ``kl`` (masked mean of
        the per-token KL as used in the loss), ``entropy`` (masked mean),
        ``entropy_mask/kept_fraction`` and ``ratio_mask/masked_fraction``.

    Raises:
        ValueError: unknown ``loss_type`` / ``importance_sampling_level``, mismatched shapes,
            ``beta != 0`` without ``ref_logps``, ``top_entropy_quantile < 1`` or
            ``entropy_coef != 0`` without ``entropies``, out-of-range hyperparameters, or an
            option ``rloo`` does not take.

    The string / float / bool keyword arguments select the program: close over them (or mark
    them static) when jitting.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}.")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"Unknown importance_sampling_level {importance_sampling_level!r}; "
            f"expected one of {IMPORTANCE_SAMPLING_LEVELS}."
        )
    logps = jnp.asarray(logps)
    if logps.ndim != 2:
        raise ValueError(f"logps must be [batch, completion_length], got shape {logps.shape}.")
    if not jnp.issubdtype(logps.dtype, jnp.floating):
        raise ValueError(f"logps must be floating point, got {logps.dtype}.")
    shape = tuple(logps.shape)
    batch, length = shape
    _check_same_shape("old_logps", old_logps, shape)
    _check_same_shape("completion_mask", completion_mask, shape)
    _check_same_shape("ref_logps", ref_logps, shape)
    _check_same_shape("entropies", entropies, shape)
    if truncated is not None and tuple(jnp.shape(truncated)) != (batch,):
        raise ValueError(f"truncated must have shape ({batch},), got {tuple(jnp.shape(truncated))}.")
    advantages = jnp.asarray(advantages)
    if tuple(advantages.shape) not in ((batch,), shape):
        raise ValueError(f"advantages must have shape ({batch},) or {shape}, got {tuple(advantages.shape)}.")
    for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high), ("beta", beta),
                        ("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                        ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg)):
        _check_number(name, value)
    for name, value in (("delta", delta), ("sapo_temperature_pos", sapo_temperature_pos),
                        ("sapo_temperature_neg", sapo_temperature_neg)):
        _check_number(name, value, positive=True)
    _check_number("entropy_coef", entropy_coef, signed=True)
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps for the KL penalty.")
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {top_entropy_quantile}.")
    if (top_entropy_quantile < 1.0 or entropy_coef != 0.0) and entropies is None:
        raise ValueError("top_entropy_quantile < 1 and entropy_coef != 0 need per-token entropies.")
    if ratio_mask_bounds is not None:
        if len(ratio_mask_bounds) != 2 or not 0.0 <= ratio_mask_bounds[0] <= ratio_mask_bounds[1]:
            raise ValueError(f"ratio_mask_bounds must be (low, high) with 0 <= low <= high, got {ratio_mask_bounds}.")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}.")
    if loss_type == "rloo":
        if beta != 0.0:
            raise ValueError("loss_type 'rloo' takes its KL penalty in the reward (as TRL's RLOO), "
                             "not in the loss: beta must be 0.")
        if importance_sampling_level != "token":
            raise ValueError("loss_type 'rloo' has its own sequence ratio (of summed log-probs): "
                             "importance_sampling_level must be 'token'.")
        if top_entropy_quantile < 1.0:
            raise ValueError("loss_type 'rloo' has one term per completion: top_entropy_quantile must be 1.")
        if delta is not None:
            raise ValueError("loss_type 'rloo' is TRL's RLOO loss, which has no delta: delta must be None.")
        if advantages.ndim != 1:
            raise ValueError(f"loss_type 'rloo' needs per-completion advantages ({batch},).")

    # Low-precision log-probs (bf16) are aggregated in float32; the gradient comes back in their dtype.
    dtype = jnp.promote_types(logps.dtype, jnp.float32)
    mask = jnp.asarray(completion_mask).astype(dtype)
    if truncated is not None:
        mask = mask * jnp.logical_not(jnp.asarray(truncated).astype(bool))[:, None].astype(dtype)
    valid = mask > 0

    def at_valid(x: jax.Array | None) -> jax.Array | None:
        # Selected, not multiplied: a NaN or inf at padding never reaches the loss or its
        # gradient (NaN * 0 is NaN).
        return None if x is None else jnp.where(valid, jnp.asarray(x, dtype), 0.0)

    logps = at_valid(logps.astype(dtype))
    old_logps, ref_logps, entropies = at_valid(old_logps), at_valid(ref_logps), at_valid(entropies)
    old = jax.lax.stop_gradient(logps if old_logps is None else old_logps)
    adv = jax.lax.stop_gradient(advantages.astype(dtype))
    if adv.ndim == 1:
        adv = adv[:, None]
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high

    def masked_mean(x: jax.Array) -> jax.Array:
        """Mean over valid tokens, or over completions for a ``[B, 1]`` sequence-level value."""
        x = x.astype(dtype)
        if x.shape[1] == 1 and length != 1:
            return jnp.mean(x)
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    log_ratio = logps - old
    if loss_type == "rloo":
        log_weight = jnp.sum(log_ratio * mask, axis=-1, keepdims=True)
    elif importance_sampling_level == "token":
        log_weight = log_ratio
    else:
        seq_len = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
        log_weight = jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / seq_len
    ratio = jnp.exp(log_weight)  # [B, T] or [B, 1]

    metrics: dict[str, jax.Array] = {}
    if loss_type in CLIPPED_LOSS_TYPES:
        per_token, capped = variants.clipped_surrogate(ratio, adv, eps_low, eps_high, delta)
        is_low = (capped < 1.0 - eps_low) & (adv < 0)
        is_high = (capped > 1.0 + eps_high) & (adv > 0)
        metrics["clip_ratio/low_mean"] = masked_mean(is_low)
        metrics["clip_ratio/high_mean"] = masked_mean(is_high)
        metrics["clip_ratio/region_mean"] = masked_mean(is_low | is_high)
    elif loss_type == "cispo":
        per_token = variants.cispo_term(ratio, adv, logps, eps_high)
        metrics["cispo_clip_ratio"] = masked_mean((ratio > eps_high) & (adv > 0))
    elif loss_type == "sapo":
        per_token = variants.sapo_term(ratio, adv, sapo_temperature_pos, sapo_temperature_neg)
    else:  # vespo
        phi = variants.vespo_weights(log_ratio, mask, adv, k_pos=vespo_k_pos,
                                     lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg,
                                     lambda_neg=vespo_lambda_neg)
        per_token = variants.vespo_term(phi, adv, logps)
        metrics["vespo/phi_seq_mean"] = masked_mean(phi)

    if ratio_mask_bounds is not None:
        low, high = ratio_mask_bounds
        r = jax.lax.stop_gradient(ratio)
        keep = (r >= low) & (r <= high)
        per_token = per_token * keep.astype(dtype)
        metrics["ratio_mask/masked_fraction"] = masked_mean(~keep)
    ent_keep = None
    if top_entropy_quantile < 1.0:
        ent_keep = high_entropy_mask(jax.lax.stop_gradient(entropies), valid, top_entropy_quantile)
        per_token = per_token * ent_keep.astype(dtype)
        metrics["entropy_mask/kept_fraction"] = masked_mean(ent_keep)

    if ref_logps is not None and loss_type != "rloo":
        ref = jax.lax.stop_gradient(jnp.asarray(ref_logps, dtype))
        diff = ref - logps
        per_token_kl = jnp.exp(diff) - diff - 1.0
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl)

    if loss_type == "rloo":
        loss = jnp.mean(per_token[:, 0])
    else:
        masked_loss = jnp.broadcast_to(per_token, shape) * mask
        if loss_type in ("grpo", "sapo"):
            seq_len = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
            loss = jnp.mean(jnp.sum(masked_loss, axis=-1) / seq_len)
        elif loss_type == "bnpo":
            loss = jnp.sum(masked_loss) / jnp.maximum(jnp.sum(mask), 1.0)
        elif loss_type == "dr_grpo":
            max_len = length if max_completion_length is None else max_completion_length
            loss = jnp.sum(masked_loss) / (batch * max_len)
        elif loss_type == "luspo":
            loss = jnp.mean(jnp.sum(masked_loss, axis=-1))
        else:  # dapo, cispo, vespo
            n_items = jnp.sum(mask) if num_items_in_batch is None else jnp.asarray(num_items_in_batch, dtype)
            loss = jnp.sum(masked_loss) / jnp.maximum(n_items, 1.0)

    if entropy_coef != 0.0:
        bonus_mask = mask if ent_keep is None else mask * ent_keep.astype(dtype)
        bonus = jnp.sum(entropies * bonus_mask) / jnp.maximum(jnp.sum(bonus_mask), 1.0)
        metrics["policy_loss"] = loss
        loss = loss - entropy_coef * bonus

    metrics["ratio/mean"] = masked_mean(jax.lax.stop_gradient(ratio))
    if entropies is not None:
        metrics["entropy"] = masked_mean(jax.lax.stop_gradient(entropies))
    metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
    return loss, metrics
