"""The pieces of the DPO loss family: per-pair formulas, f-divergence scores, LD-DPO
sequence log-probs and WPO weights.

:func:`sparsejax.losses.dpo_loss` is the entry point, and its module docstring
(:mod:`sparsejax.losses.dpo`) gives the notation and each loss type's formula with its
paper: per pair, summed completion log-probs ``pi_c, pi_r`` (policy) and ``ref_c, ref_r``
(reference), log-ratios ``h = pi - ref``, f-divergence scores ``s`` of them,
``Delta = s_c - s_r``, completion token counts ``n_c, n_r``. :data:`FORMULAS` maps each
loss type to its ``[B]`` per-pair loss of a :class:`PairInputs`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

log_sigmoid = jax.nn.log_sigmoid

# exp(.) of an alpha-divergence score stays finite in float32 below this argument.
ALPHA_DIVERGENCE_CLAMP = 80.0


# ---------------------------------------------------------------------- sequence log-probs


def ld_sequence_logps(chosen: jax.Array, rejected: jax.Array, chosen_mask: jax.Array,
                      rejected_mask: jax.Array, ld_alpha: float | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """``([B] chosen, [B] rejected)`` sequence log-probs from ``[B, T]`` per-token ones.

    Without ``ld_alpha`` the masked sums. With it, LD-DPO's length desensitisation (Liu et
    al., arXiv 2409.06411): the first ``min(n_c, n_r)`` completion tokens of each side (the
    length the pair shares) count fully, the tokens past it (the longer side's verbose
    tail) count ``ld_alpha`` times::

        pi = sum_{t <= min(n_c, n_r)} logp_t + ld_alpha * sum_{t > min(n_c, n_r)} logp_t

    where ``t`` numbers a side's completion tokens (its mask's running count). The
    reference is reduced the same way.
    """
    chosen_mask = jnp.asarray(chosen_mask)
    rejected_mask = jnp.asarray(rejected_mask)
    shared = jnp.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))[:, None]

    def reduce(tokens, mask):
        valid = mask.astype(bool)
        tokens = jnp.where(valid, tokens, 0.0)
        if ld_alpha is None:
            return tokens.sum(-1)
        head = valid & (jnp.cumsum(mask.astype(jnp.int32), axis=-1) <= shared)
        tail = valid & ~head
        return (jnp.where(head, tokens, 0.0).sum(-1)
                + ld_alpha * jnp.where(tail, tokens, 0.0).sum(-1))

    return reduce(jnp.asarray(chosen), chosen_mask), reduce(jnp.asarray(rejected), rejected_mask)


def wpo_weights(logps: jax.Array, log_sum_sq_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """WPO's per-sequence weight (Zhou et al., arXiv 2406.11827, Eq. 2), a constant::

        w = exp( (1/n) sum_t [ log p(y_t) - log sum_v p(v)^2 ] )

    the length-normalised probability of the sequence under the policy, each token's
    probability divided by the policy's probability of sampling any token twice
    (``log_sum_sq_probs`` per token). ``[B, T]`` inputs, ``[B]`` weights.
    """
    valid = jnp.asarray(mask).astype(bool)
    aligned = jnp.where(valid, logps - log_sum_sq_probs, 0.0).sum(-1)
    n = jnp.maximum(valid.sum(-1), 1).astype(aligned.dtype)
    return jax.lax.stop_gradient(jnp.exp(aligned / n))


# ---------------------------------------------------------------------- f-divergences


def f_divergence_score(logratio: jax.Array, kind: str, alpha: float = 0.5) -> jax.Array:
    """f-DPO's score ``f'(u)`` of the policy/reference ratio ``u = exp(h)`` (Wang et al.,
    arXiv 2309.16240), which replaces the log-ratio ``h`` in the pair's difference:

    * ``reverse_kl``: ``h`` (plain DPO);
    * ``forward_kl``: ``1 - exp(-h)``;
    * ``js_divergence``: ``log 2 + log sigma(h)`` (``= log(2u / (1 + u))``);
    * ``alpha_divergence``: ``(exp((alpha - 1) h) - 1) / (alpha - 1)`` with the exponent
      clamped at :data:`ALPHA_DIVERGENCE_CLAMP` (``h`` itself for ``alpha`` within 1e-6
      of 1, the reverse-KL limit).
    """
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1.0 - jnp.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2.0) + log_sigmoid(logratio)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        t = jnp.minimum((alpha - 1.0) * logratio, ALPHA_DIVERGENCE_CLAMP)
        return jnp.expm1(t) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


# ---------------------------------------------------------------------- per-pair losses


class PairInputs(NamedTuple):
    """What the per-pair formulas read (``[B]`` arrays, floats for the options)."""

    chosen: jax.Array  # pi_c
    rejected: jax.Array  # pi_r
    ref_chosen: jax.Array  # ref_c
    ref_rejected: jax.Array  # ref_r
    chosen_score: jax.Array  # s_c
    rejected_score: jax.Array  # s_r
    chosen_len: jax.Array | None  # n_c (>= 1), None when not known
    rejected_len: jax.Array | None
    sft: jax.Array | None  # the batch's chosen token-mean NLL (a scalar), None when not known
    beta: float
    eps: float
    discopop_tau: float
    simpo_gamma: float

    @property
    def h_c(self):
        return self.chosen - self.ref_chosen

    @property
    def h_r(self):
        return self.rejected - self.ref_rejected

    @property
    def delta(self):
        return self.chosen_score - self.rejected_score


def _smoothed_sigmoid(z: jax.Array, eps: float) -> jax.Array:
    """``-(1 - eps) log sigma(z) - eps log sigma(-z)``: the logistic loss of a label
    flipped with probability ``eps``."""
    return -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``."""
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def _per_token(x: PairInputs, chosen, rejected):
    return chosen / x.chosen_len, rejected / x.rejected_len


def _sigmoid(x):
    return _smoothed_sigmoid(x.beta * x.delta, x.eps)


def _hinge(x):
    return jax.nn.relu(1.0 - x.beta * x.delta)


def _ipo(x):
    if x.chosen_len is None:
        delta = x.delta
    else:
        c, r = _per_token(x, x.chosen_score, x.rejected_score)
        delta = c - r
    return (delta - 1.0 / (2.0 * x.beta)) ** 2


def _exo_pair(x):
    z = x.beta * x.delta
    return (jax.nn.sigmoid(z) * (log_sigmoid(z) - math.log1p(-x.eps))
            + jax.nn.sigmoid(-z) * (log_sigmoid(-z) - math.log(x.eps)))


def _nca_pair(x):
    c, r = x.beta * x.h_c, x.beta * x.h_r
    return -log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r)


def _robust(x):
    z, eps = x.beta * x.delta, x.eps
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _bco_pair(x):
    return -log_sigmoid(x.beta * x.h_c) - log_sigmoid(-x.beta * x.h_r)


def _sppo_hard(x):
    half = 0.5 / x.beta
    return (x.h_c - half) ** 2 + (x.h_r + half) ** 2


def _aot(x):
    gap = jnp.sort(x.chosen - x.rejected) - jnp.sort(x.ref_chosen - x.ref_rejected)
    return _smoothed_sigmoid(x.beta * gap, x.eps)


def _aot_unpaired(x):
    return _smoothed_sigmoid(x.beta * (jnp.sort(x.h_c) - jnp.sort(x.h_r)), x.eps)


def _apo_zero(x):
    return (1.0 - jax.nn.sigmoid(x.beta * x.h_c)) + jax.nn.sigmoid(x.beta * x.h_r)


def _apo_down(x):
    return jax.nn.sigmoid(x.beta * x.h_c) + (1.0 - jax.nn.sigmoid(x.beta * (x.h_c - x.h_r)))


def _discopop(x):
    z = x.beta * x.delta
    mix = jax.nn.sigmoid(z / x.discopop_tau)
    return (1.0 - mix) * -log_sigmoid(z) + mix * jnp.exp(-z)


def _sft(x):
    return jnp.broadcast_to(x.sft, x.chosen.shape)


def _sigmoid_norm(x):
    c, r = _per_token(x, x.chosen_score, x.rejected_score)
    return -log_sigmoid(x.beta * (c - r))


def _simpo(x):
    c, r = _per_token(x, x.chosen, x.rejected)
    return _smoothed_sigmoid(x.beta * (c - r) - x.simpo_gamma, x.eps)


def _orpo(x):
    c, r = _per_token(x, x.chosen, x.rejected)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return -x.beta * log_sigmoid(log_odds)


FORMULAS: dict[str, Callable[[PairInputs], jax.Array]] = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair,
    "nca_pair": _nca_pair, "robust": _robust, "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop, "sft": _sft,
    "sigmoid_norm": _sigmoid_norm, "simpo": _simpo, "orpo": _orpo,
}
