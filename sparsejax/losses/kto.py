"""Kahneman-Tversky Optimization on unpaired examples (Ethayarajh et al., arXiv 2402.01306).

Each example is a prompt ``x``, one completion ``y`` and a label: desirable (``y`` is
good) or undesirable. Inputs are the completion log-probs under the policy ``pi`` and a
frozen reference ``ref``, summed per sequence (``[B]``) or per token (``[B, T]`` with the
completion mask); ``h = pi(y|x) - ref(y|x)`` is the implicit reward's log-ratio.

The reference point ``z`` (the paper's ``z_0 = KL(pi(y'|x) || ref(y'|x))``) is estimated
from mismatched pairs of the same micro-batch: example ``i``'s prompt with another
example's completion ``y'`` (the trainer rotates the completions by one,
:func:`sparsejax.trainers.kto_data.mismatched_index`)::

    z = max(0, mean_i [pi(y'_i|x_i) - ref(y'_i|x_i)])

a constant (no gradient flows through it). With ``beta`` the inverse temperature, ``w_D``
/ ``w_U`` the desirable / undesirable weights and ``sigma`` the logistic function, the
per-example losses (``loss_type``) are:

* ``"kto"`` -- the paper's Eq. 7 (its value function ``1 - v``):
  desirable ``w_D (1 - sigma(beta (h - z)))``, undesirable ``w_U (1 - sigma(beta (z - h)))``.
* ``"apo_zero_unpaired"`` -- APO-zero on unpaired data (D'Oosterlinck et al., arXiv
  2408.06266, Eq. 7 per side; no reference point, ``z`` is not estimated):
  desirable ``w_D (1 - sigma(beta h))``, undesirable ``w_U sigma(beta h)``.

The loss is the mean of the ``B`` weighted per-example losses (desirable and undesirable
together). The weights balance unequal numbers of the two kinds: the paper (Eq. 8)
recommends ``w_D n_D / (w_U n_U)`` in ``[1, 4/3]``.

Metrics: ``kl`` (``z``), ``rewards/chosen`` and ``rewards/rejected`` (means of
``beta h`` over the desirable / undesirable examples), ``logps/chosen``,
``logps/rejected`` (means of ``pi``) and ``rewards/margins`` (the difference of the two
reward means). A mean over no example is NaN (the trainer leaves it out of its record).
Formulas, weights, the clamped and detached ``z`` and the metrics match TRL 1.16's
``KTOTrainer``, as ``tests/losses/test_kto_loss.py`` checks against its code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.config.kto import check_kto_options


def _sequence(logps, mask, name: str, dtype) -> jax.Array:
    """``[B]`` sums of ``[B, T]`` per-token log-probs under ``mask`` (or ``[B]`` as given)."""
    x = jnp.asarray(logps)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}.")
    x = x.astype(dtype)
    if mask is None:
        if x.ndim != 1:
            raise ValueError(f"{name} must be [B] sums (or [B, T] with a mask), got shape {x.shape}.")
        return x
    if tuple(jnp.shape(mask)) != x.shape or x.ndim != 2:
        raise ValueError(f"{name} must be [B, T] with a mask of its shape, got {x.shape} "
                         f"and {tuple(jnp.shape(mask))}.")
    return jnp.where(jnp.asarray(mask).astype(bool), x, 0.0).sum(-1)


def kl_reference_point(policy_kl_logps, ref_kl_logps, *, mask=None) -> jax.Array:
    """``z = max(0, mean(pi(y'|x) - ref(y'|x)))`` over the mismatched pairs, a constant.

    ``[B]`` sums, or ``[B, T]`` per-token log-probs with their ``mask``.
    """
    dtype = jnp.promote_types(jnp.asarray(policy_kl_logps).dtype, jnp.float32)
    pi = _sequence(policy_kl_logps, mask, "policy_kl_logps", dtype)
    ref = _sequence(ref_kl_logps, mask if jnp.ndim(ref_kl_logps) == 2 else None,
                    "ref_kl_logps", dtype)
    if ref.shape != pi.shape:
        raise ValueError(f"ref_kl_logps must have shape {pi.shape}, got {ref.shape}.")
    return jax.lax.stop_gradient(jnp.maximum(jnp.mean(pi - ref), 0.0))


def kto_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
    policy_kl_logps: jax.Array | None = None,
    ref_kl_logps: jax.Array | None = None,
    kl_mask: jax.Array | None = None,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO-family loss over ``B`` unpaired examples (see the module docstring).

    Args:
        policy_logps: the completions' log-probs under the policy (differentiated): ``[B]``
            sums, or ``[B, T]`` per token with ``mask``.
        ref_logps: the reference's, ``[B]`` sums or ``[B, T]`` per token (with ``mask``);
            a constant.
        labels: ``[B]`` bool (or 0/1): True for a desirable completion.
        mask: ``[B, T]`` completion mask of per-token inputs.
        policy_kl_logps, ref_kl_logps: the mismatched pairs' log-probs under the policy
            and the reference (``[B]`` sums, or ``[B, T]`` with ``kl_mask``), for ``kto``'s
            reference point (both constants); unused by ``apo_zero_unpaired``.
        kl_mask: ``[B, T]`` mask of per-token mismatched inputs.
        beta: inverse temperature (> 0).
        loss_type: ``kto`` or ``apo_zero_unpaired``.
        desirable_weight, undesirable_weight: the weights ``w_D``, ``w_U`` (>= 0).

    Returns:
        ``(loss, metrics)``: the scalar loss and the metrics of the module docstring.
    """
    check_kto_options(loss_type, beta=beta, desirable_weight=desirable_weight,
                      undesirable_weight=undesirable_weight)
    dtype = jnp.promote_types(jnp.asarray(policy_logps).dtype, jnp.float32)
    pi = _sequence(policy_logps, mask, "policy_logps", dtype)
    ref = _sequence(ref_logps, mask if jnp.ndim(ref_logps) == 2 else None, "ref_logps", dtype)
    if ref.shape != pi.shape:
        raise ValueError(f"ref_logps must have shape {pi.shape}, got {ref.shape}.")
    labels = jnp.asarray(labels)
    if labels.shape != pi.shape:
        raise ValueError(f"labels must have shape {pi.shape}, got {labels.shape}.")
    desirable = labels.astype(bool)
    ref = jax.lax.stop_gradient(ref)

    h = pi - ref
    if loss_type == "kto":
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError("loss_type 'kto' needs policy_kl_logps and ref_kl_logps (the "
                             "mismatched pairs' log-probs) for its reference point.")
        z = kl_reference_point(policy_kl_logps, ref_kl_logps, mask=kl_mask).astype(dtype)
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * (h - z))
        rejected_losses = 1.0 - jax.nn.sigmoid(beta * (z - h))
    else:  # apo_zero_unpaired
        z = jnp.zeros((), dtype)
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * h)
        rejected_losses = jax.nn.sigmoid(beta * h)
    losses = jnp.where(desirable, desirable_weight * chosen_losses,
                       undesirable_weight * rejected_losses)
    loss = jnp.mean(losses)

    def side_mean(x, on):
        count = on.sum()
        total = jnp.where(on, x, 0.0).sum()
        return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)

    rewards = jax.lax.stop_gradient(beta * h)
    pi_const = jax.lax.stop_gradient(pi)
    chosen_reward = side_mean(rewards, desirable)
    rejected_reward = side_mean(rewards, ~desirable)
    metrics = {
        "kl": z,
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "logps/chosen": side_mean(pi_const, desirable),
        "logps/rejected": side_mean(pi_const, ~desirable),
    }
    return loss, metrics
