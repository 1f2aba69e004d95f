"""Group-relative advantages for GRPO-style RL.

Every prompt is sampled ``group_size`` times; the rewards of one prompt's completions form a
group, laid out contiguously: ``rewards[g * group_size : (g + 1) * group_size]``.

Two baselines are provided:

* :func:`group_advantages` -- GRPO (Shao et al., DeepSeekMath, arXiv 2402.03300), as TRL's
  ``GRPOTrainer`` computes it (``scale_rewards`` in ``"group" | "batch" | "none"``)::

      A_i = (r_i - mean_group(r)) / (std(r) + eps)

  with ``std`` the *unbiased* (Bessel, ``ddof=1``) standard deviation, taken over the group
  (``scale="group"``) or over the whole batch (``scale="batch"``), and ``eps`` added to the
  standard deviation, not to the variance. ``scale="none"`` is Dr. GRPO's unscaled advantage
  (Liu et al., arXiv 2503.20783).

* :func:`mean_only_advantages` -- ``A_i = r_i - mean_group(r)``, the baseline used by
  prime-rl and by the Multiple Ticket Hypothesis GSM8K runs (arXiv 2602.01599).

NaN rewards mark unscorable completions (as in TRL): they are left out of the means and
standard deviations, and their advantage is 0. A group with fewer than two scored
completions has an undefined standard deviation, so under ``scale="group"`` its advantages
are 0 as well (under ``"none"`` only the mean is needed).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from sparsejax.config.names import ADVANTAGE_SCALES

AdvantageScale = Literal["group", "batch", "none"]


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
) -> jax.Array:
    """GRPO advantages ``(r - group_mean) / (std + eps)`` for a flat reward vector.

    Args:
        rewards: ``[num_prompts * group_size]`` rewards, groups contiguous. NaN marks an
            unscorable completion (excluded from the statistics, advantage 0).
        group_size: completions per prompt (TRL's ``num_generations``).
        scale: ``"group"`` divides by the per-group std, ``"batch"`` by the std of the whole
            batch, ``"none"`` does not divide (Dr. GRPO). The mean is always the group mean.
        eps: added to the standard deviation (TRL uses ``1e-4``).

    Returns:
        ``[num_prompts * group_size]`` advantages, in the rewards' floating dtype.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"Unknown advantage scale {scale!r}; expected one of {ADVANTAGE_SCALES}.")
    grouped = _grouped(rewards, group_size)
    centered = grouped - jnp.nanmean(grouped, axis=1, keepdims=True)
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
    return jnp.nan_to_num(centered.reshape(-1), nan=0.0)


def mean_only_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """prime-rl / Multiple Ticket Hypothesis advantages: ``A_i = r_i - mean_group(r)``, no scaling.

    Identical to ``group_advantages(rewards, group_size, scale="none")``.
    """
    return group_advantages(rewards, group_size, scale="none")
