"""The GRPO loss variants (cispo, sapo, luspo, vespo, rloo), delta, truncated-completion
masking, the entropy bonus and RLOO advantages: parity with TRL 1.16's own code.

References, all TRL 1.16:

* ``trl.trainer.grpo_trainer.GRPOTrainer._compute_loss`` (with its ``get_gamma_weights`` and
  ``get_high_entropy_mask``), called as an unbound function on a minimal stand-in ``self``
  whose log-prob hook returns the prepared tensors (as ``test_grpo_loss.py`` does);
* ``trl.trainer.rloo_trainer.RLOOTrainer._compute_loss``, likewise;
* ``mask_truncated_completions`` and the RLOO advantages live inside TRL's
  ``_generate_and_score_completions``, which needs a model and generation: their lines are
  transcribed below, each naming its source.

Loss, gradient (w.r.t. the policy log-probs and, through the entropy bonus, the entropies)
and every metric both sides log are compared in float64 on fresh random inputs.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
rloo_trainer = pytest.importorskip("trl.trainer.rloo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

from sparsejax.config import GRPOConfig  # noqa: E402
from sparsejax.losses import group_advantages, grpo_loss, rloo_advantages  # noqa: E402

from references import TRLGRPOStandIn  # noqa: E402
from references import _SingleProcessAccelerator as SingleProcessAccelerator  # noqa: E402

GRPOTrainer = grpo_trainer.GRPOTrainer
RLOOTrainer = rloo_trainer.RLOOTrainer

RTOL, ATOL = 1e-5, 1e-12  # float64 on both sides: they agree to rounding
METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio",
           "vespo/phi_seq_mean", "entropy", "kl", "policy_loss")


def _truncate(mask, truncated):
    """``GRPOTrainer._generate_and_score_completions`` (and RLOO's), mask_truncated_completions:
    ``completion_mask = completion_mask * (~is_truncated).unsqueeze(1).int()``."""
    return mask * (~truncated).unsqueeze(1).int()


def _random_batch(seed: int, batch: int = 10, length: int = 9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    lengths[2] = max(lengths[2], 5)
    lengths[3] = 0  # an empty completion must not produce NaNs
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float64)
    logps = np.log(rng.uniform(0.02, 1.0, size=(batch, length)))
    old = logps + rng.normal(0.0, 0.35, size=(batch, length))  # ratios on both sides of the clip range
    ref = logps + rng.normal(0.0, 0.5, size=(batch, length))
    adv = rng.normal(size=batch)
    adv[1] = 0.0
    adv[2] = abs(adv[2]) + 0.1  # a kept completion of each sign
    adv[5] = -abs(adv[5]) - 0.1
    entropies = rng.uniform(0.0, 4.0, size=(batch, length))
    truncated = np.zeros(batch, bool)
    truncated[[0, 4]] = True  # the full-length completion and one more
    return logps, old, ref, adv, mask, entropies, truncated


def _trl_grpo(logps, old, ref, adv, mask, entropies, truncated, *, mask_truncated, **config):
    logps, old, ref, adv, mask, entropies = (
        torch.tensor(x, dtype=torch.float64) for x in (logps, old, ref, adv, mask, entropies))
    logps.requires_grad_(True)
    entropies.requires_grad_(True)
    if mask_truncated:
        mask = _truncate(mask, torch.tensor(truncated))
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
        # _generate_and_score_completions: num_items_in_batch = loss_mask.sum(), after truncation
        "num_items_in_batch": mask.sum(),
    }
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    grad_ent = np.zeros(entropies.shape) if entropies.grad is None else entropies.grad.numpy()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), logps.grad.numpy(), grad_ent, metrics


def _ours(logps, old, ref, adv, mask, entropies, truncated, *, mask_truncated, **config):
    with jax.enable_x64(True):
        fn = functools.partial(grpo_loss, **config)

        def loss_fn(lp, ent):
            return fn(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), ref_logps=jnp.asarray(ref),
                      entropies=ent, truncated=jnp.asarray(truncated) if mask_truncated else None)

        (loss, metrics), (g_lp, g_ent) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            jnp.asarray(logps), jnp.asarray(entropies))
        return float(loss), np.asarray(g_lp), np.asarray(g_ent), {k: float(v) for k, v in metrics.items()}


def _config(loss_type, level, **overrides):
    # TRL builds SAPO's per-token temperatures with torch.where of two Python floats, which rounds them
    # to float32: the tests use temperatures that float32 holds exactly (TRL's defaults: 1.0 and 1.05).
    config = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.0, epsilon=0.2, epsilon_high=None,
                  delta=None, use_bias_correction_kl=False, top_entropy_quantile=1.0, max_completion_length=12,
                  entropy_coef=0.0, sapo_temperature_pos=1.0, sapo_temperature_neg=1.0625, vespo_k_pos=2.0,
                  vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, mask_truncated=False)
    config.update(overrides)
    return config


def _check_against_trl(data, config):
    ref_loss, ref_grad, ref_grad_ent, ref_metrics = _trl_grpo(*data, **config)
    loss, grad, grad_ent, metrics = _ours(*data, **config)
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and np.all(np.isfinite(grad_ent))
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad, ref_grad, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad_ent, ref_grad_ent, rtol=RTOL, atol=ATOL)
    assert np.abs(ref_grad).max() > 1e-4  # the check is not vacuous
    if config["entropy_coef"]:
        assert np.abs(ref_grad_ent).max() > 1e-4
    for key in METRICS:
        if key in ref_metrics:
            assert key in metrics, key
            np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)
        elif key != "kl":  # ours reports the KL whenever ref_logps are given, TRL only when beta != 0
            assert key not in metrics, key
    return ref_loss, ref_metrics


FEATURES = {
    "plain": dict(),
    "params": dict(epsilon_high=0.28, sapo_temperature_pos=0.75, sapo_temperature_neg=1.625, vespo_k_pos=1.5,
                   vespo_lambda_pos=2.5, vespo_k_neg=2.0, vespo_lambda_neg=1.0),
    "kl": dict(beta=0.04, use_bias_correction_kl=True),
    "truncated": dict(mask_truncated=True),
    "entropy_bonus": dict(entropy_coef=0.03),
    "everything": dict(beta=0.1, use_bias_correction_kl=True, epsilon_high=0.3, mask_truncated=True,
                       entropy_coef=-0.02, top_entropy_quantile=0.4),
}
NEW_TYPES = ["cispo", "sapo", "luspo", "vespo"]


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_new_loss_types_match_trl(loss_type, level, feature):
    data = _random_batch(zlib.crc32(f"{loss_type}-{level}-{feature}".encode()))
    config = _config(loss_type, level, **FEATURES[feature])
    if loss_type == "cispo" and feature in ("params", "everything"):
        config["epsilon_high"] = 1.0  # the cap of the ratio: some tokens above it, some below
    _, ref_metrics = _check_against_trl(data, config)
    if loss_type == "cispo" and config["epsilon_high"] == 1.0 and level == "token":
        assert 0.0 < ref_metrics["cispo_clip_ratio"] < 1.0


@pytest.mark.parametrize("feature", ["truncated", "entropy_bonus", "everything"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_truncation_and_entropy_bonus_on_the_older_types_match_trl(loss_type, level, feature):
    data = _random_batch(zlib.crc32(f"old-{loss_type}-{level}-{feature}".encode()))
    _check_against_trl(data, _config(loss_type, level, **FEATURES[feature]))


@pytest.mark.parametrize("delta", [1.4, 1.1])  # 1.1 < 1 + epsilon_high: the clip fractions see the capped ratio
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_delta_two_sided_clipping_matches_trl(loss_type, level, delta):
    logps, old, ref, adv, *rest = _random_batch(zlib.crc32(f"delta-{loss_type}-{level}-{delta}".encode()))
    old = logps - np.abs(np.random.default_rng(5).normal(0.0, 0.8, size=logps.shape))  # ratios above delta
    adv[0] = -abs(adv[0])  # delta caps the ratio where the advantage is negative
    data = (logps, old, ref, adv, *rest)
    config = _config(loss_type, level, delta=delta, epsilon_high=0.28, beta=0.05, use_bias_correction_kl=True)
    _check_against_trl(data, config)
    # delta changes the loss (else the test would not test it)
    without = _ours(*data, **{**config, "delta": None})[0]
    assert abs(without - _ours(*data, **config)[0]) > 1e-6


def test_vespo_clamps_extreme_ratios_as_trl():
    """Summed log-ratios past TRL's clamps: +-25 per token (clamped to 20) on two rows."""
    logps, old, ref, adv, mask, ent, trunc = _random_batch(21)
    old = old.copy()
    old[2] = logps[2] - 25.0
    old[5] = logps[5] + 25.0
    adv[2], adv[5] = 1.0, -1.0
    data, config = (logps, old, ref, adv, mask, ent, trunc), _config("vespo", "token")
    _, ref_metrics = _check_against_trl(data, config)
    assert 0.0 < ref_metrics["vespo/phi_seq_mean"]
    # row 5's weight is tiny (W clamped to 1e-8) but not 0, row 2's is 0 (W = e^20): compare relatively,
    # without an absolute floor
    ref_grad, grad = _trl_grpo(*data, **config)[1], _ours(*data, **config)[1]
    assert 0.0 < np.abs(ref_grad[5]).max() < 1e-10
    np.testing.assert_array_equal(ref_grad[2], 0.0)
    np.testing.assert_allclose(grad, ref_grad, rtol=RTOL, atol=0.0)


def test_defaults_are_trls():
    """The new settings default as TRL 1.16's GRPOConfig / RLOOConfig (read from TRL, not copied)."""
    import inspect

    from trl import GRPOConfig as TRLGRPOConfig
    from trl import RLOOConfig as TRLRLOOConfig

    ours = GRPOConfig()
    trl_defaults = {k: v.default for k, v in inspect.signature(TRLGRPOConfig).parameters.items()}
    loss_defaults = {k: v.default for k, v in inspect.signature(grpo_loss).parameters.items()}
    shared = ("importance_sampling_level", "delta", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
              "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "entropy_coef", "epsilon", "epsilon_high",
              "top_entropy_quantile", "beta", "use_bias_correction_kl")
    for name in shared:
        assert loss_defaults[name] == trl_defaults[name], name
        if name != "use_bias_correction_kl":  # the config calls it kl_bias_correction
            assert getattr(ours, name) == trl_defaults[name], name
    assert ours.mask_truncated_completions == trl_defaults["mask_truncated_completions"]
    assert ours.normalize_advantages == inspect.signature(TRLRLOOConfig).parameters["normalize_advantages"].default


def test_entropy_bonus_is_the_mean_entropy_whatever_the_loss_type():
    """TRL's documented objective: L = L_policy - coef * H, H the masked mean entropy."""
    logps, old, ref, adv, mask, ent, trunc = _random_batch(8)
    for loss_type in ("grpo", "dr_grpo", "vespo"):
        with jax.enable_x64(True):
            base, _ = grpo_loss(logps, old, adv, mask, entropies=ent, loss_type=loss_type)
            loss, metrics = grpo_loss(logps, old, adv, mask, entropies=ent, loss_type=loss_type, entropy_coef=0.5)
        np.testing.assert_allclose(float(metrics["policy_loss"]), float(base), rtol=1e-12)
        np.testing.assert_allclose(float(loss), float(base) - 0.5 * (ent * mask).sum() / mask.sum(), rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# RLOO loss


class _TRLRLOO:
    """A bare object carrying exactly the attributes ``RLOOTrainer._compute_loss`` reads."""

    _compute_loss = RLOOTrainer._compute_loss

    def __init__(self, logps, entropies, *, epsilon, epsilon_high):
        self._logps, self._entropies = logps, entropies
        self.accelerator = SingleProcessAccelerator()
        self.model = SimpleNamespace(training=True)
        self.aux_loss_enabled = False
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        return self._logps, self._entropies, None


def _trl_rloo(logps, old, adv, mask, entropies, truncated, *, epsilon, epsilon_high, mask_truncated):
    logps, old, adv, mask, entropies = (
        torch.tensor(x, dtype=torch.float64) for x in (logps, old, adv, mask, entropies))
    logps.requires_grad_(True)
    if mask_truncated:
        mask = _truncate(mask, torch.tensor(truncated))
    # RLOOTrainer._generate_and_score_completions: old_logps = (old_per_token_logps * completion_mask).sum(1)
    old_logps = (old * mask).sum(1)
    trainer = _TRLRLOO(logps, entropies, epsilon=epsilon, epsilon_high=epsilon_high)
    batch = logps.shape[0]
    inputs = {
        "prompt_ids": torch.zeros((batch, 2), dtype=torch.long),
        "prompt_mask": torch.ones((batch, 2), dtype=torch.long),
        "completion_ids": torch.zeros(logps.shape, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_logps": old_logps,
    }
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), logps.grad.numpy(), metrics


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_rloo_loss_matches_trl(epsilon_high, mask_truncated):
    logps, old, _, adv, mask, ent, trunc = _random_batch(zlib.crc32(f"rloo-{epsilon_high}-{mask_truncated}".encode()),
                                                         batch=12)
    old = logps + np.random.default_rng(3).normal(0.0, 0.15, size=logps.shape)  # sequence ratios around the clip
    ref_loss, ref_grad, ref_metrics = _trl_rloo(logps, old, adv, mask, ent, trunc, epsilon=0.2,
                                                epsilon_high=epsilon_high, mask_truncated=mask_truncated)
    with jax.enable_x64(True):
        (loss, metrics), grad = jax.value_and_grad(
            lambda lp: grpo_loss(lp, old, adv, mask, entropies=ent, loss_type="rloo", epsilon=0.2,
                                 epsilon_high=epsilon_high, truncated=trunc if mask_truncated else None),
            has_aux=True)(jnp.asarray(logps))
    np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=RTOL, atol=ATOL)
    assert np.abs(ref_grad).max() > 1e-4
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy"):
        np.testing.assert_allclose(float(metrics[key]), ref_metrics[key], rtol=RTOL, atol=ATOL, err_msg=key)
    assert 0.0 < ref_metrics["clip_ratio/region_mean"] < 1.0  # both branches of the clip are exercised


def test_rloo_loss_is_not_luspo_off_policy():
    """Same gradient on-policy (ratio 1), different loss value, different gradient off-policy."""
    logps, old, _, adv, mask, _, _ = _random_batch(4)
    with jax.enable_x64(True):
        def both(o):
            kinds = (("rloo", "token"), ("luspo", "sequence"))
            return [jax.value_and_grad(lambda lp, t=t, lv=lv: grpo_loss(
                lp, o, adv, mask, loss_type=t, importance_sampling_level=lv)[0])(jnp.asarray(logps))
                for t, lv in kinds]
        (l_rloo, g_rloo), (l_luspo, g_luspo) = both(None)
        np.testing.assert_allclose(np.asarray(g_rloo), np.asarray(g_luspo), rtol=1e-12, atol=1e-15)
        assert abs(float(l_rloo) - float(l_luspo)) > 1e-3
        (_, g_rloo), (_, g_luspo) = both(old)
        assert np.abs(np.asarray(g_rloo) - np.asarray(g_luspo)).max() > 1e-3


def test_rloo_refuses_what_trl_rloo_does_not_define():
    logps, old, ref, adv, mask, ent, _ = _random_batch(1)
    for kwargs, match in ((dict(beta=0.1, ref_logps=ref), "beta"),
                          (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
                          (dict(top_entropy_quantile=0.5, entropies=ent), "top_entropy_quantile"),
                          (dict(delta=2.0), "delta")):
        with pytest.raises(ValueError, match=match):
            grpo_loss(logps, old, adv, mask, loss_type="rloo", **kwargs)
    with pytest.raises(ValueError, match="per-completion"):
        grpo_loss(logps, old, np.ones_like(logps), mask, loss_type="rloo")
    for kwargs, match in ((dict(beta=0.1), "beta"), (dict(delta=2.0), "delta"),
                          (dict(importance_sampling_level="sequence"), "importance_sampling_level")):
        with pytest.raises(ValueError, match=match):
            GRPOConfig(loss_type="rloo", **kwargs)


def test_variant_arguments_are_validated():
    logps, old, _, adv, mask, _, _ = _random_batch(2)
    for kwargs, match in ((dict(sapo_temperature_pos=0.0), "sapo_temperature_pos"),
                          (dict(vespo_lambda_neg=-1.0), "vespo_lambda_neg"),
                          (dict(delta=float("nan")), "delta"),
                          (dict(entropy_coef=0.1), "entropies"),
                          (dict(truncated=np.zeros(4, bool)), "truncated")):
        with pytest.raises(ValueError, match=match):
            grpo_loss(logps, old, adv, mask, **kwargs)
    for kwargs, match in ((dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
                          (dict(vespo_k_pos=-1.0), "vespo_k_pos"), (dict(delta=0.0), "delta"),
                          (dict(entropy_coef=math.inf), "entropy_coef"),
                          (dict(advantage_estimator="ppo"), "advantage_estimator"),
                          (dict(importance_sampling_level="batch"), "importance_sampling_level")):
        with pytest.raises(ValueError, match=match):
            GRPOConfig(**kwargs)


# ----------------------------------------------------------------------------------------------
# RLOO advantages


def _trl_rloo_advantages(rewards, num_generations, normalize_advantages):
    """``RLOOTrainer._generate_and_score_completions`` (TRL 1.16), the advantage lines verbatim
    (``nanstd`` is ``trl.trainer.utils.nanstd``)."""
    rewards = torch.tensor(rewards, dtype=torch.float64)
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)  # (num_prompts, 1)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)  # (num_prompts, 1)
    if num_generations > 1:
        baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)  # (num_prompts, num_generations)
        baselines = baselines.view(-1)  # Flatten back to match rewards shape
        advantages = rewards - baselines
    else:  # this case doesn't occur during training, but could in eval when num_generations_eval=1
        advantages = torch.zeros_like(rewards)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (trl_utils.nanstd(advantages) + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return advantages.numpy()


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_rloo_advantages_match_trl(seed, normalize):
    rng = np.random.default_rng(seed)
    group_size = 4
    rewards = rng.normal(size=6 * group_size)
    rewards[rng.choice(rewards.size, 3, replace=False)] = np.nan  # unscorable completions
    rewards[4:8] = [np.nan, 0.7, np.nan, np.nan]  # a group with one scorable completion
    expected = _trl_rloo_advantages(rewards, group_size, normalize)
    got = np.asarray(jax.jit(functools.partial(rloo_advantages, group_size=group_size, normalize=normalize))(
        jnp.float32(rewards)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[4:8], 0.0)
    np.testing.assert_array_equal(got[np.isnan(rewards)], 0.0)
    assert np.abs(got).max() > 0.1
    with jax.enable_x64(True):  # float64: TRL's nanstd rounds its Bessel factor count / (count - 1) to float32
        got64 = np.asarray(rloo_advantages(jnp.asarray(rewards), group_size, normalize=normalize))
    np.testing.assert_allclose(got64, expected, rtol=1e-6, atol=1e-12)
    # the shared code path: rloo_advantages is group_advantages with the leave-one-out baseline
    np.testing.assert_allclose(got, np.asarray(group_advantages(
        jnp.float32(rewards), group_size, scale="none", estimator="rloo", normalize=normalize)), rtol=1e-6)


def test_rloo_advantages_against_numpy_and_single_generation():
    rng = np.random.default_rng(9)
    rewards = rng.uniform(size=12)
    grouped = rewards.reshape(3, 4)
    loo = (grouped.sum(1, keepdims=True) - grouped) / 3
    np.testing.assert_allclose(rloo_advantages(rewards, 4), (grouped - loo).reshape(-1), rtol=1e-5, atol=1e-6)
    # n / (n - 1) times the group-mean advantage when every completion is scored
    np.testing.assert_allclose(rloo_advantages(rewards, 4), 4 / 3 * np.asarray(group_advantages(
        rewards, 4, scale="none")), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rloo_advantages(rewards, 1), 0.0)
    np.testing.assert_allclose(_trl_rloo_advantages(rewards, 1, True), 0.0)
    # scale and estimator compose: the leave-one-out advantage over the group's reward std
    std = grouped.std(axis=1, ddof=1, keepdims=True)
    np.testing.assert_allclose(group_advantages(rewards, 4, scale="group", estimator="rloo"),
                               ((grouped - loo) / (std + 1e-4)).reshape(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(rewards, 4, estimator="ppo")
