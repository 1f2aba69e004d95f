"""Direct Preference Optimization and its family of pairwise losses.

Inputs are the completion log-probs of a chosen (preferred) and a rejected completion per
pair, under the policy and optionally a frozen reference: summed per sequence (``[B]``),
or per token (``[B, T]`` with the completion masks, which the length-aware options need).
Per pair, with ``pi`` the (summed) policy log-prob and ``ref`` the reference's,

    h_c = pi_c - ref_c,   h_r = pi_r - ref_r,   s = f'(exp(h)),   Delta = s_c - s_r,

where the score ``s`` is ``h`` itself unless ``f_divergence_type`` picks another
f-divergence (f-DPO, Wang et al., arXiv 2309.16240: ``forward_kl`` ``1 - exp(-h)``,
``js_divergence`` ``log 2 + log sigma(h)``, ``alpha_divergence``
``(exp((alpha - 1) h) - 1) / (alpha - 1)``). ``beta`` is the inverse temperature,
``eps`` = ``label_smoothing``, ``n`` a completion's token count, ``z = beta Delta``,
``L_eps(z) = -(1 - eps) log sigma(z) - eps log sigma(-z)`` and ``bar pi = pi / n``.
The per-pair losses (``loss_type``):

* ``"sigmoid"`` -- DPO (Rafailov et al., arXiv 2305.18290): ``L_eps(z)``; ``eps > 0`` is the
  conservative DPO (cDPO, Mitchell 2023) of labels flipped with probability ``eps``.
* ``"hinge"`` -- SLiC (Zhao et al., arXiv 2305.10425): ``max(0, 1 - z)``.
* ``"ipo"`` -- IPO (Azar et al., arXiv 2310.12036, Eq. 17): ``(s_c/n_c - s_r/n_r - 1/(2 beta))^2``;
  with no lengths known, ``(Delta - 1/(2 beta))^2``.
* ``"exo_pair"`` -- EXO (Ji et al., arXiv 2402.00856, Eq. 16), ``eps`` in ``(0, 1)``:
  ``sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps)``.
* ``"nca_pair"`` -- NCA (Chen et al., arXiv 2402.05369):
  ``-log sigma(beta h_c) - log sigma(-beta h_c) / 2 - log sigma(-beta h_r) / 2``.
* ``"robust"`` -- robust DPO (Chowdhury et al., arXiv 2403.00409), ``eps`` in ``[0, 0.5)``:
  ``(-(1 - eps) log sigma(z) + eps log sigma(-z)) / (1 - 2 eps)``.
* ``"bco_pair"`` -- BCO on pairs (Jung et al., arXiv 2404.04656), no reward shift:
  ``-log sigma(beta h_c) - log sigma(-beta h_r)``.
* ``"sppo_hard"`` -- SPPO with hard win probabilities (Wu et al., arXiv 2405.00675):
  ``(h_c - 1/(2 beta))^2 + (h_r + 1/(2 beta))^2``.
* ``"aot"`` -- AOT (Melnyk et al., arXiv 2406.05882): ``L_eps(beta g)``, ``g`` the i-th
  smallest ``pi_c - pi_r`` of the batch minus the i-th smallest ``ref_c - ref_r``.
* ``"aot_unpaired"`` -- AOT unpaired: ``g`` = i-th smallest ``h_c`` minus i-th smallest ``h_r``.
* ``"apo_zero"`` -- APO-zero (D'Oosterlinck et al., arXiv 2408.06266, Eq. 7):
  ``1 - sigma(beta h_c) + sigma(beta h_r)``.
* ``"apo_down"`` -- APO-down (ibid., Eq. 8): ``sigma(beta h_c) + 1 - sigma(beta (h_c - h_r))``.
* ``"discopop"`` -- DiscoPOP (Lu et al., arXiv 2406.08414, Eq. 5), ``m = sigma(z / tau)``
  (``discopop_tau``): ``(1 - m)(-log sigma(z)) + m exp(-z)``.
* ``"sft"`` -- the negative log-likelihood of the chosen completions: minus the mean
  log-prob over every chosen completion token of the batch (one value for all pairs).
* ``"sigmoid_norm"`` -- DPO on per-token means: ``-log sigma(beta (s_c/n_c - s_r/n_r))``.
* ``"simpo"`` -- SimPO (Meng et al., arXiv 2405.14734), no reference, ``gamma`` =
  ``simpo_gamma``: ``L_eps(beta (bar pi_c - bar pi_r) - gamma)``.
* ``"orpo"`` -- ORPO's odds-ratio term (Hong et al., arXiv 2403.07691, Eqs. 4 and 7), no
  reference, ``beta`` its ``lambda``: ``-beta log sigma(log odds(bar pi_c) -
  log odds(bar pi_r))`` with ``log odds(p) = p - log(1 - exp(p))``.

``loss_type`` may list several types; the loss is ``sum_k w_k mean_pairs(loss_k)`` with
``loss_weights`` ``w`` (1 each by default). MPO (Wang et al., arXiv 2411.10442) is
``sigmoid + bco_pair + sft``; CPO (Xu et al., arXiv 2401.08417) is a reference-free
``sigmoid + sft``; full ORPO is ``orpo + sft`` (its NLL on the completion tokens) and
CPO-SimPO ``simpo + sft``.

Options of the per-token inputs:

* ``ld_alpha`` -- LD-DPO (Liu et al., arXiv 2409.06411): the tokens of a pair's longer
  completion past the shorter one's length count ``ld_alpha`` times in ``pi`` (and in a
  per-token reference); see :func:`~sparsejax.losses.dpo_family.ld_sequence_logps`.
  ``sft`` keeps the plain token log-probs.
* ``use_weighting`` -- WPO (Zhou et al., arXiv 2406.11827, Eq. 2): each pair's loss is
  multiplied by the constant ``w_c w_r``, ``w = exp(mean_t (log p(y_t) - log sum_v
  p(v)^2))`` from the per-token ``log sum_v p(v)^2`` given.

A missing reference (``None``) means reference-free DPO: reference log-probs of 0. The
implicit rewards ``beta h`` give the metrics. Every formula, option and combination
matches TRL 1.16 (``DPOTrainer._compute_loss``; ``simpo`` its ``CPOTrainer.cpo_loss``,
``orpo`` its ``ORPOTrainer.odds_ratio_loss``), as the tests check against TRL's code.
Where TRL differs: its ``"sigmoid"`` ignores ``label_smoothing`` (cDPO here, matching its
one-pair ``"aot_unpaired"``); ``aot`` sorts over the whole (micro-)batch given.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from sparsejax.config.dpo import check_loss_options
from sparsejax.losses.dpo_family import (
    FORMULAS,
    PairInputs,
    f_divergence_score,
    ld_sequence_logps,
    wpo_weights,
)

# Loss types that divide by the completion lengths (ipo falls back to raw sums).
_NEEDS_LENGTHS = ("sigmoid_norm", "simpo", "orpo")


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    chosen_mask: jax.Array | None = None,
    rejected_mask: jax.Array | None = None,
    ld_alpha: float | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    use_weighting: bool = False,
    chosen_log_sum_sq_probs: jax.Array | None = None,
    rejected_log_sum_sq_probs: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO-family loss over ``B`` pairs (see the module docstring).

    Args:
        policy_chosen_logps: the chosen completions' log-probs (differentiated): ``[B]``
            sums, or ``[B, T]`` per token with ``chosen_mask``.
        policy_rejected_logps: likewise for the rejected completions (``[B]`` or ``[B, T']``).
        ref_chosen_logps: the reference's, ``[B]`` sums (reduced as the policy's are: with
            ``ld_alpha`` its weighted sums) or ``[B, T]`` per token; ``None``:
            reference-free. Treated as constants.
        ref_rejected_logps: likewise for the rejected completions.
        beta: inverse temperature (``tau`` for IPO, ``lambda`` for ORPO); > 0.
        loss_type: one type, or a sequence of types summed with ``loss_weights``.
        loss_weights: one weight per type (default 1 each).
        label_smoothing: ``eps``: cDPO for ``sigmoid``, ``aot``, ``aot_unpaired``, ``simpo``
            (``[0, 0.5]``), robust DPO (``[0, 0.5)``), EXO (``(0, 1)``, required); must be 0
            when no type uses it.
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts for ``[B]``
            inputs (per-token inputs take them from the masks): IPO's, ``sigmoid_norm``'s,
            ``simpo``'s and ``orpo``'s per-token means, ``sft``'s token count.
        chosen_mask, rejected_mask: ``[B, T]`` completion masks of per-token inputs.
        ld_alpha: LD-DPO's weight of the tokens past the shorter completion, in ``[0, 1]``
            (per-token inputs); None: plain sums.
        f_divergence_type: ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence`` or
            ``alpha_divergence``; only for the types built on ``Delta``.
        f_alpha_divergence_coef: the ``alpha`` of ``alpha_divergence``.
        discopop_tau: DiscoPOP's temperature (> 0).
        simpo_gamma: SimPO's target margin.
        use_weighting: WPO weights (per-token inputs and the two ``*_log_sum_sq_probs``).
        chosen_log_sum_sq_probs, rejected_log_sum_sq_probs: ``[B, T]`` per-token
            ``log sum_v p(v)^2`` of the policy, for ``use_weighting``.

    Returns:
        ``(loss, metrics)`` with the scalar loss and ``rewards/chosen``,
        ``rewards/rejected`` (means of ``beta h``), ``rewards/margins`` (mean of
        ``beta (h_c - h_r)``), ``rewards/accuracies`` (fraction of pairs with chosen reward
        strictly greater), ``logps/chosen``, ``logps/rejected`` (means of ``pi``).
    """
    types, weights = check_loss_options(
        loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing,
        ld_alpha=ld_alpha, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau,
        simpo_gamma=simpo_gamma, use_weighting=use_weighting)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("Give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free).")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("Give both chosen_lengths and rejected_lengths, or neither.")
    if (chosen_mask is None) != (rejected_mask is None):
        raise ValueError("Give both chosen_mask and rejected_mask, or neither.")

    chosen = jnp.asarray(policy_chosen_logps)
    rejected = jnp.asarray(policy_rejected_logps)
    if not jnp.issubdtype(chosen.dtype, jnp.floating):
        raise ValueError(f"log-probs must be floating point, got {chosen.dtype}.")
    dtype = jnp.promote_types(chosen.dtype, jnp.float32)  # bf16 inputs are combined in float32
    per_token = chosen_mask is not None
    if per_token:
        if chosen_lengths is not None:
            raise ValueError("Per-token inputs take their lengths from the masks; give no chosen_lengths.")
        _check_shape("policy_chosen_logps", chosen, jnp.shape(chosen_mask))
        _check_shape("policy_rejected_logps", rejected, jnp.shape(rejected_mask))
        if chosen.ndim != 2 or chosen.shape[0] != rejected.shape[0]:
            raise ValueError(f"per-token log-probs must be [B, T] with one batch, got {chosen.shape} "
                             f"and {rejected.shape}.")
    elif chosen.ndim != 1:
        raise ValueError(f"policy_chosen_logps must be 1-D [batch] (or [B, T] with chosen_mask), "
                         f"got shape {chosen.shape}.")
    else:
        for option, given in (("ld_alpha", ld_alpha is not None), ("use_weighting", use_weighting)):
            if given:
                raise ValueError(f"{option} needs per-token log-probs with chosen_mask and rejected_mask.")
    shape = chosen.shape[:1]
    if not per_token:
        _check_shape("policy_rejected_logps", rejected, shape)
    for name, x in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if x is not None:
            _check_shape(name, x, shape)

    chosen_tok, rejected_tok = chosen.astype(dtype), rejected.astype(dtype)
    if per_token:
        c_mask, r_mask = jnp.asarray(chosen_mask), jnp.asarray(rejected_mask)
        chosen, rejected = ld_sequence_logps(chosen_tok, rejected_tok, c_mask, r_mask, ld_alpha)
        len_c = c_mask.sum(-1).astype(dtype)
        len_r = r_mask.sum(-1).astype(dtype)
    else:
        chosen, rejected = chosen_tok, rejected_tok
        len_c = None if chosen_lengths is None else jnp.asarray(chosen_lengths).astype(dtype)
        len_r = None if rejected_lengths is None else jnp.asarray(rejected_lengths).astype(dtype)

    if ref_chosen_logps is None:
        ref_c = ref_r = jnp.zeros(shape, dtype)
    else:
        ref_c, ref_r = jnp.asarray(ref_chosen_logps), jnp.asarray(ref_rejected_logps)
        if ref_c.ndim == 2 and per_token:
            _check_shape("ref_chosen_logps", ref_c, jnp.shape(chosen_mask))
            _check_shape("ref_rejected_logps", ref_r, jnp.shape(rejected_mask))
            ref_c, ref_r = ld_sequence_logps(ref_c.astype(dtype), ref_r.astype(dtype), c_mask, r_mask,
                                             ld_alpha)
        else:
            _check_shape("ref_chosen_logps", ref_c, shape)
            _check_shape("ref_rejected_logps", ref_r, shape)
        ref_c = jax.lax.stop_gradient(ref_c.astype(dtype))
        ref_r = jax.lax.stop_gradient(ref_r.astype(dtype))

    if len_c is None and any(t in _NEEDS_LENGTHS or t == "sft" for t in types):
        needs = [t for t in types if t in _NEEDS_LENGTHS or t == "sft"]
        raise ValueError(f"loss_type {', '.join(needs)} needs the completion lengths: give "
                         "chosen_lengths and rejected_lengths, or per-token log-probs with masks.")
    sft = None
    if "sft" in types:  # the chosen token-mean NLL, on the plain (not LD-weighted) log-probs
        total = (jnp.where(c_mask.astype(bool), chosen_tok, 0.0).sum() if per_token else chosen.sum())
        sft = -total / jnp.maximum(len_c.sum(), 1.0)
    if len_c is not None:
        len_c, len_r = jnp.maximum(len_c, 1.0), jnp.maximum(len_r, 1.0)

    h_c, h_r = chosen - ref_c, rejected - ref_r
    inputs = PairInputs(
        chosen=chosen, rejected=rejected, ref_chosen=ref_c, ref_rejected=ref_r,
        chosen_score=f_divergence_score(h_c, f_divergence_type, f_alpha_divergence_coef),
        rejected_score=f_divergence_score(h_r, f_divergence_type, f_alpha_divergence_coef),
        chosen_len=len_c, rejected_len=len_r, sft=sft, beta=beta, eps=label_smoothing,
        discopop_tau=discopop_tau, simpo_gamma=simpo_gamma)
    pair_weight = None
    if use_weighting:
        if chosen_log_sum_sq_probs is None or rejected_log_sum_sq_probs is None:
            raise ValueError("use_weighting needs chosen_log_sum_sq_probs and rejected_log_sum_sq_probs.")
        _check_shape("chosen_log_sum_sq_probs", chosen_log_sum_sq_probs, jnp.shape(chosen_mask))
        _check_shape("rejected_log_sum_sq_probs", rejected_log_sum_sq_probs, jnp.shape(rejected_mask))
        pair_weight = (wpo_weights(chosen_tok, jnp.asarray(chosen_log_sum_sq_probs, dtype), c_mask)
                       * wpo_weights(rejected_tok, jnp.asarray(rejected_log_sum_sq_probs, dtype), r_mask))

    loss = jnp.zeros((), dtype)
    for name, weight in zip(types, weights):
        losses = FORMULAS[name](inputs)
        if pair_weight is not None:
            losses = losses * pair_weight
        loss = loss + weight * jnp.mean(losses)

    chosen_rewards = jax.lax.stop_gradient(beta * h_c)
    rejected_rewards = jax.lax.stop_gradient(beta * h_r)
    metrics = {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(dtype)),
        "logps/chosen": jax.lax.stop_gradient(jnp.mean(chosen)),
        "logps/rejected": jax.lax.stop_gradient(jnp.mean(rejected)),
    }
    return loss, metrics


def _check_shape(name: str, x, shape) -> None:
    if tuple(jnp.shape(x)) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(jnp.shape(x))}.")
