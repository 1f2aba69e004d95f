"""The per-token policy-gradient terms of the GRPO loss family, one function per variant.

:func:`sparsejax.losses.grpo_loss` is the entry point: it computes the importance ratio,
picks one of these terms by ``loss_type``, applies the token masks and the KL penalty and
aggregates. Each function here maps the ratio ``w`` (``[B, T]`` at token level, ``[B, 1]``
at sequence level), the advantages ``A`` (``[B, 1]`` or ``[B, T]``) and, where the term
needs them, the policy log-probs ``logp`` to the per-token loss ``pg`` (before masking).
Gradients flow only where the formulas below say so; everything marked ``sg`` is a
constant (``stop_gradient``).

* clipped surrogate (PPO / GRPO / DAPO / LUSPO / RLOO)::

      pg = -min( min(w, delta) A, clip(w, 1 - eps_low, 1 + eps_high) A )

  ``delta`` (INTELLECT-2's two-sided clipping, arXiv 2505.07291) caps the unclipped ratio
  from above; without it the first term is ``w A``.

* CISPO (MiniMax-M1, arXiv 2506.13585): the ratio, capped at ``eps_max`` (TRL reads it from
  ``epsilon_high``; ScaleRL, arXiv 2510.13786, recommends 5), weights the log-likelihood::

      pg = -sg(min(w, eps_max)) A logp

* SAPO (arXiv 2511.20347): a sigmoid gate of temperature ``tau`` replaces the hard clip;
  ``tau = tau_pos`` where ``A > 0``, else ``tau_neg``::

      pg = -(4 / tau) sigmoid(tau (w - 1)) A

  whose gradient ``-4 sigmoid(.)(1 - sigmoid(.)) w A`` equals the plain policy gradient at
  ``w = 1`` and decays smoothly away from it.

* VESPO (arXiv 2602.10693): a Gamma-shaped weight of the *sequence* ratio
  ``W = exp(clip(sum_t m_t clip(log w_t, -20, 20), log 1e-8, 20))`` (the sum of the
  per-token log-ratios, whatever ``importance_sampling_level``), with ``(k, lambda) =
  (k_pos, lambda_pos)`` where ``A >= 0`` else ``(k_neg, lambda_neg)`` and ``lambda``
  floored at ``1e-4``::

      phi = exp(lambda + k log W - lambda W)       (phi(1) = 1; non-finite -> 0)
      pg  = -sg(phi) A logp
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

#: VESPO's clamps: per-token log-ratios to [-20, 20], the summed log-ratio to [log 1e-8, 20].
VESPO_LOG_RATIO_CLAMP = 20.0
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LAMBDA_MIN = 1e-4


def clipped_surrogate(ratio: jax.Array, adv: jax.Array, eps_low: float, eps_high: float,
                      delta: float | None = None) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate ``-min(w' A, clip(w) A)`` with ``w' = min(w, delta)``.

    Returns ``(pg, w')``: the loss term and the (possibly capped) ratio that the clip
    fractions are measured on (as TRL measures them).
    """
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    capped = ratio if delta is None else jnp.minimum(ratio, delta)
    return -jnp.minimum(capped * adv, clipped * adv), capped


def cispo_term(ratio: jax.Array, adv: jax.Array, logps: jax.Array, cap: float) -> jax.Array:
    """CISPO: ``-sg(min(w, cap)) A logp``."""
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, cap))
    return -weight * adv * logps


def sapo_term(ratio: jax.Array, adv: jax.Array, temperature_pos: float,
              temperature_neg: float) -> jax.Array:
    """SAPO: ``-(4 / tau) sigmoid(tau (w - 1)) A``, ``tau`` chosen by the sign of ``A``."""
    tau = jnp.where(adv > 0, temperature_pos, temperature_neg).astype(ratio.dtype)
    return -jax.nn.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv


def vespo_weights(log_ratio: jax.Array, mask: jax.Array, adv: jax.Array, *, k_pos: float,
                  lambda_pos: float, k_neg: float, lambda_neg: float) -> jax.Array:
    """VESPO's Gamma weight ``phi`` of each completion's summed log-ratio (a constant).

    ``log_ratio`` and ``mask`` are ``[B, T]``; the result broadcasts like ``adv``
    (``[B, 1]`` for per-completion advantages).
    """
    log_ratio = jax.lax.stop_gradient(log_ratio)
    clamped = jnp.clip(log_ratio, -VESPO_LOG_RATIO_CLAMP, VESPO_LOG_RATIO_CLAMP)
    log_w = jnp.sum(clamped * mask, axis=-1, keepdims=True)
    log_w = jnp.clip(log_w, VESPO_LOG_W_MIN, VESPO_LOG_RATIO_CLAMP)
    nonneg = adv >= 0
    k = jnp.where(nonneg, k_pos, k_neg).astype(log_w.dtype)
    lam = jnp.maximum(jnp.where(nonneg, lambda_pos, lambda_neg), VESPO_LAMBDA_MIN).astype(log_w.dtype)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    return jnp.where(jnp.isfinite(phi), phi, 0.0)


def vespo_term(phi: jax.Array, adv: jax.Array, logps: jax.Array) -> jax.Array:
    """VESPO: ``-sg(phi) A logp``."""
    return -jax.lax.stop_gradient(phi) * adv * logps
