"""Direct Preference Optimization losses on sequence log-probs.

Inputs are summed completion log-probs ``log pi(y|x)`` of a chosen (preferred) and a rejected
completion per pair, under the policy and optionally a frozen reference. With

    h_c = log pi(y_c|x) - log pi_ref(y_c|x),   h_r = log pi(y_r|x) - log pi_ref(y_r|x),
    Delta = h_c - h_r,

the per-pair losses are (``beta`` the inverse temperature, ``eps`` = ``label_smoothing``):

* ``"sigmoid"`` -- DPO (Rafailov et al., arXiv 2305.18290)::

      -log sigmoid(beta Delta)

  with ``eps > 0`` the conservative DPO (cDPO, Mitchell 2023) of labels flipped with
  probability ``eps``: ``-(1 - eps) log sigmoid(beta Delta) - eps log sigmoid(-beta Delta)``.
* ``"hinge"`` -- SLiC (Zhao et al., arXiv 2305.10425): ``max(0, 1 - beta Delta)``.
* ``"ipo"`` -- IPO (Azar et al., arXiv 2310.12036, Eq. 17): ``(Delta' - 1 / (2 beta))^2``,
  where ``Delta'`` uses length-normalised log-ratios ``h / max(1, |y|)`` when
  ``chosen_lengths`` / ``rejected_lengths`` are given (TRL's choice), the raw ones otherwise.
* ``"robust"`` -- robust DPO (Chowdhury et al., arXiv 2403.00409) for labels flipped with
  probability ``eps`` in ``[0, 0.5)``::

      ( -(1 - eps) log sigmoid(beta Delta) + eps log sigmoid(-beta Delta) ) / (1 - 2 eps)

The loss is the mean over pairs. A missing reference (``None``) means reference-free DPO:
``pi_ref`` log-probs of 0. The implicit rewards ``beta h`` give the metrics. The formulas
match TRL 1.16's ``DPOTrainer._compute_loss`` (the tests compare against TRL's code); cDPO,
which TRL 1.16 no longer applies to ``"sigmoid"``, is checked against TRL's single-pair
``"aot_unpaired"`` loss, which reduces to it.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from sparsejax.config.names import DPO_LOSS_TYPES

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO-family loss over ``[B]`` pairs of sequence log-probs (see the module docstring).

    Args:
        policy_chosen_logps: ``[B]`` summed log-probs of the chosen completions (differentiated).
        policy_rejected_logps: ``[B]`` summed log-probs of the rejected completions.
        ref_chosen_logps: ``[B]`` reference log-probs of the chosen completions, or ``None``
            (reference-free). Treated as constants.
        ref_rejected_logps: ``[B]`` likewise for the rejected completions.
        beta: inverse temperature (``tau`` for IPO); must be > 0.
        loss_type: ``"sigmoid" | "ipo" | "hinge" | "robust"``.
        label_smoothing: label-flip probability ``eps``: cDPO for ``"sigmoid"`` (``[0, 0.5]``),
            robust DPO for ``"robust"`` (``[0, 0.5)``); must be 0 for ``"ipo"`` and ``"hinge"``.
        chosen_lengths: ``[B]`` completion token counts, used only by ``"ipo"`` to
            length-normalise the log-ratios.
        rejected_lengths: ``[B]`` likewise; give both or neither.

    Returns:
        ``(loss, metrics)`` with the scalar mean loss and ``rewards/chosen``,
        ``rewards/rejected`` (means of ``beta h``), ``rewards/margins`` (mean of
        ``beta Delta``), ``rewards/accuracies`` (fraction of pairs with chosen reward strictly
        greater), ``logps/chosen``, ``logps/rejected``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}.")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing for 'sigmoid' (cDPO) must lie in [0, 0.5], got {label_smoothing}.")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing for 'robust' must lie in [0, 0.5), got {label_smoothing}.")
    if loss_type in ("ipo", "hinge") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing is not defined for loss_type {loss_type!r}; got {label_smoothing}.")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("Give both ref_chosen_logps and ref_rejected_logps, or neither (reference-free).")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("Give both chosen_lengths and rejected_lengths, or neither.")

    chosen = jnp.asarray(policy_chosen_logps)
    rejected = jnp.asarray(policy_rejected_logps)
    if chosen.ndim != 1:
        raise ValueError(f"policy_chosen_logps must be 1-D [batch], got shape {chosen.shape}.")
    if not jnp.issubdtype(chosen.dtype, jnp.floating):
        raise ValueError(f"log-probs must be floating point, got {chosen.dtype}.")
    shape = chosen.shape
    for name, x in (
        ("policy_rejected_logps", rejected),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
    ):
        if x is not None and tuple(jnp.shape(x)) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(jnp.shape(x))}.")
    dtype = jnp.promote_types(chosen.dtype, jnp.float32)  # bf16 inputs are combined in float32
    chosen = chosen.astype(dtype)
    rejected = rejected.astype(dtype)
    if ref_chosen_logps is None:
        ref_c = jnp.zeros(shape, dtype)
        ref_r = jnp.zeros(shape, dtype)
    else:
        ref_c = jax.lax.stop_gradient(jnp.asarray(ref_chosen_logps, dtype))
        ref_r = jax.lax.stop_gradient(jnp.asarray(ref_rejected_logps, dtype))

    chosen_logratios = chosen - ref_c
    rejected_logratios = rejected - ref_r
    delta = chosen_logratios - rejected_logratios
    eps = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta) - eps * jax.nn.log_sigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is not None:
            len_c = jnp.maximum(jnp.asarray(chosen_lengths, dtype), 1.0)
            len_r = jnp.maximum(jnp.asarray(rejected_lengths, dtype), 1.0)
            ipo_delta = chosen_logratios / len_c - rejected_logratios / len_r
        else:
            ipo_delta = delta
        losses = (ipo_delta - 1.0 / (2.0 * beta)) ** 2
    else:  # robust
        clean = -(1.0 - eps) * jax.nn.log_sigmoid(beta * delta)
        flipped = -eps * jax.nn.log_sigmoid(-beta * delta)
        losses = (clean - flipped) / (1.0 - 2.0 * eps)
    loss = jnp.mean(losses)

    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    metrics = {
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(dtype)),
        "logps/chosen": jax.lax.stop_gradient(jnp.mean(chosen)),
        "logps/rejected": jax.lax.stop_gradient(jnp.mean(rejected)),
    }
    return loss, metrics
