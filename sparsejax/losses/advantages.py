"""Group-relative advantages for GRPO-style RL.

Every prompt is sampled ``group_size`` times; the rewards of one prompt's completions form a
group, laid out contiguously: ``rewards[g * group_size : (g + 1) * group_size]``.

Two baselines (``estimator``), then an optional scale and an optional whitening:

* ``estimator="grpo"``: the group mean (Shao et al., DeepSeekMath, arXiv 2402.03300), as
  TRL's ``GRPOTrainer`` computes it::

      A_i = r_i - mean_group(r)

* ``estimator="rloo"``: the leave-one-out mean of the *other* completions of the group
  (REINFORCE Leave-One-Out, Ahmadian et al., arXiv 2402.14740; TRL's ``RLOOTrainer``)::

      A_i = r_i - (sum_group(r) - r_i) / (n - 1)  =  n / (n - 1) * (r_i - mean_group(r))

  with ``n`` the number of scored completions of the group;

* ``scale`` (TRL's ``scale_rewards``, ``"group" | "batch" | "none"``) divides by
  ``std(r) + eps``, with ``std`` the *unbiased* (Bessel, ``ddof=1``) standard deviation of
  the rewards over the group (``"group"``) or the whole batch (``"batch"``), ``eps`` added
  to the standard deviation, not to the variance. ``"none"`` is Dr. GRPO's unscaled
  advantage (Liu et al., arXiv 2503.20783) and TRL's RLOO;

* ``normalize=True`` (TRL's ``RLOOConfig.normalize_advantages``) then whitens the
  advantages over the batch: ``(A - mean(A)) / (std(A) + eps)`` (``ddof=1``).

TRL's GRPO is ``estimator="grpo", normalize=False``; its RLOO is ``estimator="rloo",
scale="none"`` with its ``normalize_advantages``. :func:`mean_only_advantages` is the
baseline used by prime-rl and by the Multiple Ticket Hypothesis GSM8K runs (arXiv
2602.01599).

NaN rewards mark unscorable completions (as in TRL): they are left out of the means, the
leave-one-out sums and the standard deviations, and their advantage is 0. A group with
fewer than two scored completions has an undefined standard deviation, so under
``scale="group"`` its advantages are 0 as well (under ``"none"`` only the mean is needed);
under ``rloo`` it has no other completion to compare with, and its advantages are 0.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from sparsejax.config.names import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES

AdvantageScale = Literal["group", "batch", "none"]
AdvantageEstimator = Literal["grpo", "rloo"]


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
    """Reshape a flat ``[N]`` reward vector into ``[N // group_size, group_size]``."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a 1-D array [num_prompts * group_size], got shape {rewards.shape}.")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.shape[0]} entries, which is not a multiple of group_size={group_size}."
        )
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        rewards = rewards.astype(jnp.float32)
    return rewards.reshape(-1, group_size)


def _nanstd_ddof1(x: jax.Array, axis: int | None) -> jax.Array:
    """Unbiased (``ddof=1``) standard deviation ignoring NaNs; NaN where fewer than 2 values."""
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    sq = jnp.where(jnp.isnan(x), 0.0, (x - mean) ** 2)
    var = jnp.sum(sq, axis=axis, keepdims=True) / jnp.where(count > 1, count - 1, 1)
    return jnp.where(count > 1, jnp.sqrt(var), jnp.nan)


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    scale: AdvantageScale = "group",
    eps: float = 1e-4,
    estimator: AdvantageEstimator = "grpo",
    normalize: bool = False,
) -> jax.Array:
    """Group-relative advantages of a flat reward vector (see the module docstring).

    Args:
        rewards: ``[num_prompts * group_size]`` rewards, groups contiguous. NaN marks an
            unscorable completion (excluded from the statistics, advantage 0).
        group_size: completions per prompt (TRL's ``num_generations``).
        scale: ``"group"`` divides by the per-group reward std, ``"batch"`` by the reward
            std of the whole batch, ``"none"`` does not divide (Dr. GRPO, RLOO).
        eps: added to the standard deviations (TRL uses ``1e-4``).
        estimator: ``"grpo"`` subtracts the group mean, ``"rloo"`` the mean of the other
            completions of the group.
        normalize: whiten the advantages over the batch last (TRL RLOO's
            ``normalize_advantages``).

    Returns:
        ``[num_prompts * group_size]`` advantages, in the rewards' floating dtype.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"Unknown advantage scale {scale!r}; expected one of {ADVANTAGE_SCALES}.")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"Unknown advantage estimator {estimator!r}; expected one of {ADVANTAGE_ESTIMATORS}.")
    grouped = _grouped(rewards, group_size)
    if estimator == "grpo":
        centered = grouped - jnp.nanmean(grouped, axis=1, keepdims=True)
    elif group_size > 1:
        count = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True)
        others = jnp.nansum(grouped, axis=1, keepdims=True) - grouped
        # One scored completion: 0 / 0, NaN, hence advantage 0 (as TRL).
        centered = grouped - others / (count - 1).astype(grouped.dtype)
    else:
        centered = jnp.where(jnp.isnan(grouped), grouped, 0.0)
    if scale == "group":
        if group_size > 1:
            std = _nanstd_ddof1(grouped, axis=1)
        else:
            std = jnp.zeros_like(grouped)
        centered = centered / (std + eps)
    elif scale == "batch":
        if grouped.size > 1:
            std = _nanstd_ddof1(grouped, axis=None)
        else:
            std = jnp.zeros_like(grouped)
        centered = centered / (std + eps)
    if normalize:
        centered = (centered - jnp.nanmean(centered)) / (_nanstd_ddof1(centered, axis=None) + eps)
    return jnp.nan_to_num(centered.reshape(-1), nan=0.0)


def rloo_advantages(rewards: jax.Array, group_size: int, *, normalize: bool = False,
                    eps: float = 1e-4) -> jax.Array:
    """TRL ``RLOOTrainer``'s advantages: reward minus the mean of the group's other rewards,
    whitened over the batch with ``normalize``.

    Identical to ``group_advantages(rewards, group_size, scale="none", estimator="rloo",
    normalize=normalize)``.
    """
    return group_advantages(rewards, group_size, scale="none", eps=eps, estimator="rloo",
                            normalize=normalize)


def mean_only_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """prime-rl / Multiple Ticket Hypothesis advantages: ``A_i = r_i - mean_group(r)``, no scaling.

    Identical to ``group_advantages(rewards, group_size, scale="none")``.
    """
    return group_advantages(rewards, group_size, scale="none")
