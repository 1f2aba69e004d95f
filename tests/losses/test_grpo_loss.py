"""GRPO-family loss and advantages: parity with TRL's own code, plus independent numpy checks.

The reference is ``trl.trainer.grpo_trainer.GRPOTrainer._compute_loss`` (TRL 1.16), called as
an unbound function on a minimal stand-in ``self`` whose log-prob hook returns the prepared
tensors. Its ``get_high_entropy_mask`` and ``trl.trainer.utils.nanstd`` are used likewise.
Parity is checked in float64 on loss, gradient w.r.t. the policy log-probs, and the metrics
TRL logs.
"""

from __future__ import annotations

import functools
import zlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

from sparsejax.losses import (  # noqa: E402
    group_advantages,
    grpo_loss,
    high_entropy_mask,
    masked_quantile,
    mean_only_advantages,
)

from references import TRLGRPOStandIn  # noqa: E402
from references import _SingleProcessAccelerator as SingleProcessAccelerator  # noqa: E402

GRPOTrainer = grpo_trainer.GRPOTrainer


def _random_batch(seed: int, batch: int = 6, length: int = 9, entropy_ties: bool = False):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    if batch > 3:
        lengths[3] = 0  # an empty completion must not produce NaNs
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float64)
    logps = np.log(rng.uniform(0.02, 1.0, size=(batch, length)))
    # Spread the ratios well past the clip range on both sides.
    old = logps + rng.normal(0.0, 0.35, size=(batch, length))
    ref = logps + rng.normal(0.0, 0.5, size=(batch, length))
    adv = rng.normal(size=batch)
    adv[1] = 0.0
    entropies = rng.uniform(0.0, 4.0, size=(batch, length))
    if entropy_ties:
        entropies = np.round(entropies * 2) / 2
    return logps, old, ref, adv, mask, entropies


def _trl_grpo(logps, old, ref, adv, mask, entropies, *, num_items_in_batch=None, dtype=None, **config):
    dtype = torch.float64 if dtype is None else dtype
    logps, old, ref, adv, mask, entropies = (
        torch.tensor(x, dtype=dtype) for x in (logps, old, ref, adv, mask, entropies)
    )
    logps.requires_grad_(True)
    trainer = TRLGRPOStandIn(logps, entropies, **config)
    batch = logps.shape[0]
    inputs = {
        "prompt_ids": torch.zeros((batch, 2), dtype=torch.long),
        "prompt_mask": torch.ones((batch, 2), dtype=torch.long),
        "completion_ids": torch.zeros(logps.shape, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum() if num_items_in_batch is None else torch.tensor(num_items_in_batch),
    }
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), logps.grad.numpy(), metrics


def _ours(logps, old, ref, adv, mask, entropies, **kwargs):
    with jax.enable_x64(True):
        fn = functools.partial(grpo_loss, **kwargs)

        def loss_fn(lp):
            return fn(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                      ref_logps=jnp.asarray(ref), entropies=jnp.asarray(entropies))

        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logps))
        return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


FEATURES = {
    "plain": dict(),
    "clip_higher": dict(epsilon_high=0.28),
    "kl": dict(beta=0.04),
    "kl_bias_corrected": dict(beta=0.04, use_bias_correction_kl=True),
    "top_entropy": dict(top_entropy_quantile=0.2),
    "everything": dict(epsilon_high=0.3, beta=0.1, use_bias_correction_kl=True, top_entropy_quantile=0.35),
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_trl(loss_type, level, feature):
    seed = zlib.crc32(f"{loss_type}-{level}-{feature}".encode())
    data = _random_batch(seed, entropy_ties=feature == "top_entropy")
    config = dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=None,
        use_bias_correction_kl=False,
        top_entropy_quantile=1.0,
        max_completion_length=data[0].shape[1] + 3,
    )
    config.update(FEATURES[feature])
    ref_loss, ref_grad, ref_metrics = _trl_grpo(*data, **config)
    loss, grad, metrics = _ours(*data, **config)

    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-6)
    assert np.abs(ref_grad).max() > 1e-5  # the check is not vacuous
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "kl"):
        if key in ref_metrics:
            np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=0, atol=1e-6, err_msg=key)
    if config["beta"] == 0.0:
        assert "kl" not in ref_metrics
    else:
        assert "kl" in metrics


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_dapo_num_items_in_batch_matches_trl(level):
    data = _random_batch(7)
    n_items = float(data[4].sum() * 3)  # as if this were one of three micro-batches
    config = dict(loss_type="dapo", importance_sampling_level=level, beta=0.02, epsilon=0.2, epsilon_high=0.28,
                  use_bias_correction_kl=False, top_entropy_quantile=1.0, max_completion_length=None)
    ref_loss, ref_grad, _ = _trl_grpo(*data, num_items_in_batch=n_items, **config)
    loss, grad, _ = _ours(*data, num_items_in_batch=n_items, **config)
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-6)


def test_float32_matches_trl():
    logps, old, ref, adv, mask, ent = _random_batch(11)
    config = dict(loss_type="grpo", importance_sampling_level="token", beta=0.04, epsilon=0.2, epsilon_high=0.28,
                  use_bias_correction_kl=True, top_entropy_quantile=0.2, max_completion_length=None)
    ref_loss, ref_grad, _ = _trl_grpo(logps, old, ref, adv, mask, ent, dtype=torch.float32, **config)
    loss, grad = jax.jit(jax.value_and_grad(  # jit-able: the hyperparameters are closed over
        lambda lp: grpo_loss(lp, jnp.float32(old), jnp.float32(adv), jnp.float32(mask), ref_logps=jnp.float32(ref),
                             entropies=jnp.float32(ent), **config)[0]
    ))(jnp.float32(logps))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), ref_loss, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 0.999, 1.0])
def test_high_entropy_mask_matches_trl(seed, quantile):
    rng = np.random.default_rng(seed)
    entropies = rng.uniform(0, 3, size=(5, 13)).astype(np.float32)
    if seed % 2:
        entropies = np.round(entropies * 4) / 4  # ties at the threshold
    mask = (rng.uniform(size=(5, 13)) < 0.7).astype(np.float32)
    stand_in = SimpleNamespace(accelerator=SingleProcessAccelerator())
    expected = GRPOTrainer.get_high_entropy_mask(
        stand_in, torch.tensor(entropies), torch.tensor(mask), 1 - quantile
    ).numpy()
    got = np.asarray(jax.jit(high_entropy_mask, static_argnums=2)(entropies, mask, quantile))
    np.testing.assert_array_equal(got, expected)
    if quantile == 1.0:
        np.testing.assert_array_equal(got, mask.astype(bool))


def test_masked_quantile_matches_numpy_and_handles_empty():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 6))
    mask = rng.uniform(size=(4, 6)) < 0.5
    for q in (0.0, 0.1, 0.5, 0.8, 1.0):
        np.testing.assert_allclose(masked_quantile(values, mask, q), np.quantile(values[mask], q), rtol=1e-5)
    assert np.isinf(masked_quantile(values, np.zeros_like(mask), 0.5))
    assert not np.asarray(high_entropy_mask(values, np.zeros_like(mask), 0.2)).any()


def _numpy_ratio_masked_grpo(logps, old, adv, mask, low, high, eps):
    """Independent reference: per-token PPO surrogate, prime-rl token masking, per-sequence token mean."""
    ratio = np.exp(logps - old)
    keep = (ratio >= low) & (ratio <= high)
    a = adv[:, None]
    surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    # d/dlogp of ratio*a is ratio*a; of the clipped term is ratio*a inside the clip range, 0 outside.
    use_unclipped = ratio * a <= np.clip(ratio, 1 - eps, 1 + eps) * a
    inside = (ratio >= 1 - eps) & (ratio <= 1 + eps)
    dsurrogate = np.where(use_unclipped | inside, ratio * a, 0.0)
    lengths = np.maximum(mask.sum(-1, keepdims=True), 1.0)
    per_token = -surrogate * keep * mask / lengths
    grad = -dsurrogate * keep * mask / lengths / logps.shape[0]
    return per_token.sum(-1).mean(), grad, 1.0 - (keep * mask).sum() / mask.sum()


@pytest.mark.parametrize("seed", range(3))
def test_ratio_mask_against_numpy(seed):
    logps, _, _, adv, mask, _ = _random_batch(seed)
    old = logps + np.random.default_rng(seed + 100).normal(0.0, 1.5, size=logps.shape)  # many ratios out of bounds
    bounds = (0.125, 8.0)
    expected_loss, expected_grad, masked_fraction = _numpy_ratio_masked_grpo(logps, old, adv, mask, *bounds, 0.2)
    assert 0.0 < masked_fraction < 1.0
    with jax.enable_x64(True):
        (loss, metrics), grad = jax.value_and_grad(
            lambda lp: grpo_loss(lp, old, adv, mask, ratio_mask_bounds=bounds), has_aux=True
        )(jnp.asarray(logps))
    np.testing.assert_allclose(float(loss), expected_loss, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=0, atol=1e-10)
    np.testing.assert_allclose(float(metrics["ratio_mask/masked_fraction"]), masked_fraction, atol=1e-12)


def test_sequence_level_ratio_mask_drops_whole_completions():
    logps, old, _, adv, mask, _ = _random_batch(4)
    old = logps.copy()
    old[2] -= 5.0 * mask[2]  # completion 2: mean log-ratio 5, ratio e^5 > 8; the others are on-policy
    with jax.enable_x64(True):
        (loss, metrics), grad = jax.value_and_grad(
            lambda lp: grpo_loss(lp, old, adv, mask, importance_sampling_level="sequence",
                                 ratio_mask_bounds=(0.125, 8.0)),
            has_aux=True,
        )(jnp.asarray(logps))
    grad = np.asarray(grad)
    np.testing.assert_array_equal(grad[2], 0.0)
    keep = mask.sum(-1) > 0
    keep[2] = False
    np.testing.assert_allclose(float(loss), -(adv * keep).sum() / len(adv), atol=1e-12)
    assert float(metrics["ratio_mask/masked_fraction"]) == pytest.approx(1 / len(adv))


def test_bfloat16_inputs_are_aggregated_in_float32():
    logps, old, _, adv, mask, _ = _random_batch(5)
    loss32, grad32 = jax.value_and_grad(lambda lp: grpo_loss(lp, old, adv, mask)[0])(jnp.float32(logps))
    loss16, grad16 = jax.value_and_grad(lambda lp: grpo_loss(lp, old, adv, mask)[0])(jnp.bfloat16(logps))
    assert loss16.dtype == jnp.float32 and grad16.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(loss16), float(loss32), atol=0.05)


def test_on_policy_default_and_gradient_is_policy_gradient():
    """old_logps=None means on-policy: ratio 1, loss -mean(A), gradient -A m / (|y| B)."""
    logps, _, _, adv, mask, _ = _random_batch(3)
    with jax.enable_x64(True):
        (loss, metrics), grad = jax.value_and_grad(
            lambda lp: grpo_loss(lp, None, adv, mask), has_aux=True
        )(jnp.asarray(logps))
    nonempty = mask.sum(-1) > 0
    np.testing.assert_allclose(float(loss), -(adv * nonempty).mean(), atol=1e-12)
    expected = -adv[:, None] * mask / np.maximum(mask.sum(-1, keepdims=True), 1) / len(adv)
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-12)
    assert float(metrics["ratio/mean"]) == pytest.approx(1.0)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_non_finite_values_at_padding_do_not_reach_loss_or_gradient(level, poison):
    """Padding (mask 0) is selected away, not multiplied by 0 (NaN * 0 is NaN)."""
    logps, old, ref, adv, mask, ent = _random_batch(11)
    pad = mask == 0
    assert pad.any()
    poisoned = [np.where(pad, poison, x) for x in (logps, old, ref, ent)]
    kw = dict(beta=0.04, importance_sampling_level=level, top_entropy_quantile=0.5)

    def run(lp, o, r, e):
        def f(x):
            return grpo_loss(x, o, adv, mask, ref_logps=r, entropies=e, **kw)
        with jax.enable_x64(True):
            (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(lp))
        return float(loss), {k: float(v) for k, v in metrics.items()}, np.asarray(grad)

    clean, dirty = run(logps, old, ref, ent), run(*poisoned)
    assert np.isfinite(dirty[0]) and dirty[0] == clean[0]
    assert dirty[1] == clean[1]
    np.testing.assert_array_equal(dirty[2], clean[2])
    assert (dirty[2][pad] == 0).all()


def test_grpo_loss_validates_arguments():
    logps = jnp.zeros((2, 3))
    adv = jnp.zeros(2)
    mask = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logps, logps, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logps, logps, adv, mask, importance_sampling_level="batch")
    with pytest.raises(ValueError, match="completion_mask"):
        grpo_loss(logps, logps, adv, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="old_logps"):
        grpo_loss(logps, jnp.zeros((3, 3)), adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logps, logps, jnp.zeros(3), mask)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, logps, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="entropies"):
        grpo_loss(logps, logps, adv, mask, top_entropy_quantile=0.2)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        grpo_loss(logps, logps, adv, mask, entropies=logps, top_entropy_quantile=1.5)
    with pytest.raises(ValueError, match="ratio_mask_bounds"):
        grpo_loss(logps, logps, adv, mask, ratio_mask_bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="logps"):
        grpo_loss(jnp.zeros(3), jnp.zeros(3), adv, jnp.ones(3))


# ----------------------------------------------------------------------------------------------
# Advantages


def _numpy_group_advantages(rewards, group_size, scale, eps=1e-4):
    """Independent reference: mean over the group, unbiased std (ddof=1), eps added to the std."""
    grouped = rewards.reshape(-1, group_size)
    centered = grouped - grouped.mean(axis=1, keepdims=True)
    if scale == "group":
        centered = centered / (grouped.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std(ddof=1) + eps)
    return centered.reshape(-1)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", range(3))
def test_group_advantages_against_numpy_and_trl_nanstd(scale, seed):
    rng = np.random.default_rng(seed)
    group_size = 4
    rewards = rng.choice([0.0, 0.5, 1.0], size=8 * group_size)
    rewards[:group_size] = 1.0  # a zero-variance group gets zero advantages
    expected = _numpy_group_advantages(rewards, group_size, scale)
    got = np.asarray(group_advantages(jnp.float32(rewards), group_size, scale=scale))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:group_size], 0.0)

    # TRL's own std helper (the one its advantage computation uses) agrees with ddof=1.
    grouped = torch.tensor(rewards).view(-1, group_size)
    trl_std = trl_utils.nanstd(grouped, dim=1).numpy()
    np.testing.assert_allclose(trl_std, rewards.reshape(-1, group_size).std(axis=1, ddof=1), atol=1e-12)
    if scale == "group":
        trl_adv = (grouped - grouped.mean(1, keepdim=True)) / (trl_utils.nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        np.testing.assert_allclose(got, trl_adv.reshape(-1).numpy(), rtol=1e-5, atol=1e-5)


def test_mean_only_advantages_and_nan_rewards():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(
        mean_only_advantages(rewards, 4), rewards - np.repeat(rewards.reshape(2, 4).mean(1), 4), atol=1e-7
    )
    with_nan = rewards.copy()
    with_nan[0] = np.nan
    adv = np.asarray(group_advantages(with_nan, 4, scale="none"))
    assert adv[0] == 0.0
    np.testing.assert_allclose(adv[1:4], with_nan[1:4] - np.mean(with_nan[1:4]), atol=1e-7)
    adv = np.asarray(group_advantages(with_nan, 4, scale="group"))
    assert np.all(np.isfinite(adv)) and adv[0] == 0.0
    g = with_nan[1:4]
    np.testing.assert_allclose(adv[1:4], (g - g.mean()) / (g.std(ddof=1) + 1e-4), rtol=1e-5)
    # a single completion per group: the std is undefined, TRL's advantages are 0
    np.testing.assert_array_equal(group_advantages(rewards, 1), 0.0)


def test_group_advantages_validates_arguments():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(jnp.zeros(4), 2, scale="global")
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(jnp.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(jnp.zeros(4), 0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(jnp.zeros((2, 2)), 2)
