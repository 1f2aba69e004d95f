"""The GRPO family of clipped policy-gradient losses, as pure functions of per-token log-probs.

Notation (per completion ``i`` and completion token ``t``; ``m_{i,t}`` the completion mask):

* importance ratio. Token level (PPO, GRPO)::

      w_{i,t} = exp(logp_{i,t} - old_logp_{i,t})

  Sequence level (GSPO, Zheng et al., arXiv 2507.18071; TRL's ``importance_sampling_level=
  "sequence"``), one ratio per completion, the exponential of the mean log-ratio::

      w_i = exp( sum_t m_{i,t} (logp_{i,t} - old_logp_{i,t}) / max(1, sum_t m_{i,t}) )

* clipped surrogate (two-sided, PPO / DAPO's decoupled ``epsilon_high``, arXiv 2503.14476)::

      pg_{i,t} = -min( w A_i, clip(w, 1 - eps_low, 1 + eps_high) A_i )

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
  - ``"grpo"``:    ``mean_i [ sum_t m l / max(1, sum_t m) ]`` (per-sequence token mean);
  - ``"bnpo"``:    ``sum_{i,t} m l / max(1, sum_{i,t} m)`` (token mean over the batch);
  - ``"dr_grpo"``: ``sum_{i,t} m l / (B * max_completion_length)`` (Dr. GRPO, arXiv 2503.20783);
  - ``"dapo"``:    ``sum_{i,t} m l / max(1, num_items_in_batch)``, where
    ``num_items_in_batch`` defaults to ``sum_{i,t} m`` (DAPO's token-level loss); pass the
    token count of the whole generation batch to normalise micro-batches consistently.

These definitions follow TRL 1.16's ``GRPOTrainer._compute_loss`` term by term (the tests
check loss, gradient and logged metrics against TRL's own code); ratio masking is not in TRL.
Only ``logps`` carries gradient: ``old_logps``, ``ref_logps``, ``advantages`` and
``entropies`` are treated as constants (``stop_gradient``).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from sparsejax.config.names import GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS

GRPOLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
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


def _check_same_shape(name: str, x: jax.Array | None, shape: tuple[int, ...]) -> None:
    if x is not None and tuple(jnp.shape(x)) != shape:
        raise ValueError(f"{name} must have shape {shape} like logps, got {tuple(jnp.shape(x))}.")


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
    loss_type: GRPOLossType = "grpo",
    importance_sampling_level: ImportanceSamplingLevel = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | jax.Array | None = None,
    use_bias_correction_kl: bool = True,
    ratio_mask_bounds: tuple[float, float] | None = None,
    entropies: jax.Array | None = None,
    top_entropy_quantile: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped GRPO-family policy-gradient loss (see the module docstring for the math).

    Args:
        logps: ``[B, T]`` log-probs of the sampled completion tokens under the policy being
            trained (the only differentiated input).
        old_logps: ``[B, T]`` log-probs under the policy that sampled (or, in PPO terms, the
            policy before this round of updates). ``None`` means on-policy:
            ``stop_gradient(logps)``, so the ratio is 1 but its gradient is not 0.
        advantages: ``[B]`` per-completion advantages (or ``[B, T]`` per-token).
        completion_mask: ``[B, T]``, 1 for completion tokens to train on, 0 for padding.
        ref_logps: ``[B, T]`` reference-policy log-probs; required when ``beta != 0``.
        beta: KL coefficient.
        epsilon: lower clip ``eps_low``; also the upper clip unless ``epsilon_high`` is set.
        epsilon_high: upper clip ``eps_high`` (DAPO's clip-higher, e.g. 0.28).
        loss_type: ``"grpo" | "bnpo" | "dr_grpo" | "dapo"`` aggregation.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        max_completion_length: the ``dr_grpo`` denominator's length; defaults to ``T``.
        num_items_in_batch: the ``dapo`` denominator; defaults to the mask's sum.
        use_bias_correction_kl: multiply the per-token KL by the importance ratio (TRL's
            ``GRPOConfig.use_bias_correction_kl``, on by default there and here).
        ratio_mask_bounds: ``(low, high)``; zero the policy-gradient term of tokens (token
            level) or whole completions (sequence level) whose ratio is outside ``[low, high]``.
        entropies: ``[B, T]`` per-token entropies of the policy; required when
            ``top_entropy_quantile < 1``; their masked mean is reported when given.
        top_entropy_quantile: fraction ``rho`` of highest-entropy valid tokens that keep
            their policy-gradient term (1.0 keeps all; the paper recommends 0.2).

    Returns:
        ``(loss, metrics)``: the scalar loss and a dict of scalar diagnostics:
        ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``
        (TRL's definitions: fraction of valid tokens, or of completions at sequence level,
        whose ratio is below ``1 - eps_low`` with negative advantage / above
        ``1 + eps_high`` with positive advantage / either), ``ratio/mean``, and when
        applicable ``kl`` (masked mean of the per-token KL as used in the loss),
        ``entropy`` (masked mean), ``entropy_mask/kept_fraction`` and
        ``ratio_mask/masked_fraction``.

    Raises:
        ValueError: unknown ``loss_type`` / ``importance_sampling_level``, mismatched shapes,
            ``beta != 0`` without ``ref_logps``, ``top_entropy_quantile < 1`` without
            ``entropies``, or out-of-range hyperparameters.

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
    advantages = jnp.asarray(advantages)
    if tuple(advantages.shape) not in ((batch,), shape):
        raise ValueError(f"advantages must have shape ({batch},) or {shape}, got {tuple(advantages.shape)}.")
    for name, value in (("epsilon", epsilon), ("epsilon_high", epsilon_high), ("beta", beta)):
        # ``not value >= 0`` also refuses NaN, which every comparison would let through.
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps for the KL penalty.")
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must lie in [0, 1], got {top_entropy_quantile}.")
    if top_entropy_quantile < 1.0 and entropies is None:
        raise ValueError("top_entropy_quantile < 1 needs per-token entropies.")
    if ratio_mask_bounds is not None:
        if len(ratio_mask_bounds) != 2 or not 0.0 <= ratio_mask_bounds[0] <= ratio_mask_bounds[1]:
            raise ValueError(f"ratio_mask_bounds must be (low, high) with 0 <= low <= high, got {ratio_mask_bounds}.")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}.")

    # Low-precision log-probs (bf16) are aggregated in float32; the gradient comes back in their dtype.
    dtype = jnp.promote_types(logps.dtype, jnp.float32)
    mask = jnp.asarray(completion_mask).astype(dtype)
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
    if importance_sampling_level == "token":
        log_weight = log_ratio
    else:
        seq_len = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
        log_weight = jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / seq_len
    ratio = jnp.exp(log_weight)  # [B, T] or [B, 1]
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)

    metrics: dict[str, jax.Array] = {}
    if ratio_mask_bounds is not None:
        low, high = ratio_mask_bounds
        r = jax.lax.stop_gradient(ratio)
        keep = (r >= low) & (r <= high)
        per_token = per_token * keep.astype(dtype)
        metrics["ratio_mask/masked_fraction"] = masked_mean(~keep)
    if top_entropy_quantile < 1.0:
        ent = jax.lax.stop_gradient(jnp.asarray(entropies))
        ent_keep = high_entropy_mask(ent, valid, top_entropy_quantile)
        per_token = per_token * ent_keep.astype(dtype)
        metrics["entropy_mask/kept_fraction"] = masked_mean(ent_keep)

    if ref_logps is not None:
        ref = jax.lax.stop_gradient(jnp.asarray(ref_logps, dtype))
        delta = ref - logps
        per_token_kl = jnp.exp(delta) - delta - 1.0
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl)

    per_token = jnp.broadcast_to(per_token, shape)
    masked_loss = per_token * mask
    if loss_type == "grpo":
        seq_len = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        loss = jnp.mean(jnp.sum(masked_loss, axis=-1) / seq_len)
    elif loss_type == "bnpo":
        loss = jnp.sum(masked_loss) / jnp.maximum(jnp.sum(mask), 1.0)
    elif loss_type == "dr_grpo":
        max_len = length if max_completion_length is None else max_completion_length
        loss = jnp.sum(masked_loss) / (batch * max_len)
    else:  # dapo
        n_items = jnp.sum(mask) if num_items_in_batch is None else jnp.asarray(num_items_in_batch, dtype)
        loss = jnp.sum(masked_loss) / jnp.maximum(n_items, 1.0)

    is_low = (ratio < 1.0 - eps_low) & (adv < 0)
    is_high = (ratio > 1.0 + eps_high) & (adv > 0)
    metrics["clip_ratio/low_mean"] = masked_mean(is_low)
    metrics["clip_ratio/high_mean"] = masked_mean(is_high)
    metrics["clip_ratio/region_mean"] = masked_mean(is_low | is_high)
    metrics["ratio/mean"] = masked_mean(jax.lax.stop_gradient(ratio))
    if entropies is not None:
        metrics["entropy"] = masked_mean(jax.lax.stop_gradient(jnp.asarray(entropies)))
    metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
    return loss, metrics
