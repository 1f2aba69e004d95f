"""The whole DPO loss family against TRL 1.16's own loss code, on per-token log-probs.

Every loss type of TRL's ``DPOConfig.loss_type``, its options (label smoothing, the
f-divergences, LD-DPO's ``ld_alpha``, WPO's ``use_weighting``, ``discopop_tau``) and
weighted combinations run through TRL's ``DPOTrainer._compute_loss`` itself (called
unbound on a stand-in, ``references.trl_dpo_loss``); SimPO through TRL's
``CPOTrainer.cpo_loss`` and ORPO's odds ratio through ``ORPOTrainer.odds_ratio_loss``
(both from ``trl/experimental``). Loss, the gradient w.r.t. every completion token's
log-prob and TRL's reward metrics are compared within 1e-5 relative, on fresh random
inputs: uneven completion lengths, a random reference, random WPO statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl.trainer.dpo_trainer")

from sparsejax.config import DPOConfig  # noqa: E402
from sparsejax.config.names import DPO_F_DIVERGENCE_LOSS_TYPES, DPO_LOSS_TYPES  # noqa: E402
from sparsejax.losses import dpo_loss, ld_sequence_logps  # noqa: E402

from references import trl_dpo_loss, trl_dpo_stand_in  # noqa: E402

RTOL = 1e-5
TRL_DPO_TYPES = [t for t in DPO_LOSS_TYPES if t not in ("simpo", "orpo")]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected")


def random_batch(seed: int, pairs: int = 6, width: int = 9) -> dict[str, np.ndarray]:
    """Per-token log-probs (0 past each completion), uneven lengths, a nearby reference and
    WPO's per-token ``log sum_v p(v)^2``."""
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        lengths = rng.integers(1, width + 1, size=pairs)
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
        logps = -rng.uniform(0.05, 2.5, size=(pairs, width)) * mask
        out[side] = logps
        out[f"{side}_mask"] = mask
        out[f"ref_{side}"] = (logps + rng.normal(0, 0.4, size=(pairs, width))) * mask
        out[f"{side}_sq"] = -rng.uniform(0.2, 2.0, size=(pairs, width)) * mask
    return out


def ours(batch, *, ref: str = "tokens", use_weighting: bool = False, dtype=np.float64,
         **options):
    """Our loss, gradient w.r.t. the per-token log-probs and metrics (float64)."""
    with jax.enable_x64(True):
        c_mask, r_mask = jnp.asarray(batch["chosen_mask"]), jnp.asarray(batch["rejected_mask"])
        if ref == "tokens":
            refs = (jnp.asarray(batch["ref_chosen"]), jnp.asarray(batch["ref_rejected"]))
        elif ref == "sums":
            refs = ld_sequence_logps(jnp.asarray(batch["ref_chosen"]),
                                     jnp.asarray(batch["ref_rejected"]), c_mask, r_mask,
                                     options.get("ld_alpha"))
        else:
            refs = (None, None)
        sq = {}
        if use_weighting:
            sq = dict(use_weighting=True,
                      chosen_log_sum_sq_probs=jnp.asarray(batch["chosen_sq"], dtype),
                      rejected_log_sum_sq_probs=jnp.asarray(batch["rejected_sq"], dtype))

        def fn(c, r):
            return dpo_loss(c, r, *refs, chosen_mask=c_mask, rejected_mask=r_mask, **sq,
                            **options)

        (loss, metrics), (g_c, g_r) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
            jnp.asarray(batch["chosen"], dtype), jnp.asarray(batch["rejected"], dtype))
        return (float(loss), np.asarray(g_c, np.float64), np.asarray(g_r, np.float64),
                {k: float(v) for k, v in metrics.items()})


def trl(batch, *, ref: str = "tokens", use_weighting: bool = False, dtype="float64",
        **options):
    refs = {"tokens": (batch["ref_chosen"], batch["ref_rejected"]),
            "none": (None, None)}[ref]
    sq = (batch["chosen_sq"], batch["rejected_sq"]) if use_weighting else None
    return trl_dpo_loss(batch["chosen"], batch["rejected"], batch["chosen_mask"],
                        batch["rejected_mask"], *refs, log_sum_sq_probs=sq, dtype=dtype,
                        **options)


def assert_matches(got, want, batch, rtol=RTOL):
    loss, g_c, g_r, metrics = got
    want_loss, want_c, want_r, want_metrics = want
    np.testing.assert_allclose(loss, want_loss, rtol=rtol, atol=1e-12)
    # Padding positions hold no log-prob (TRL routes gradient to some of them; we do not).
    for g, w, mask in ((g_c, want_c, batch["chosen_mask"]), (g_r, want_r, batch["rejected_mask"])):
        on = mask.astype(bool)
        scale = np.abs(w[on]).max()
        np.testing.assert_allclose(g[on], w[on], rtol=rtol, atol=rtol * scale * 1e-2)
    assert max(np.abs(want_c).max(), np.abs(want_r).max()) > 1e-6  # the gradient is not zero
    for key in METRICS:
        np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=rtol, atol=1e-12,
                                   err_msg=key)


def smoothing_for(types) -> float:
    types = [types] if isinstance(types, str) else types
    return 0.1 if any(t in ("exo_pair", "robust", "aot", "aot_unpaired") for t in types) else 0.0


# ---------------------------------------------------------------------- each type


@pytest.mark.parametrize("ref", ["tokens", "none"], ids=["ref", "ref_free"])
@pytest.mark.parametrize("loss_type", TRL_DPO_TYPES)
def test_each_loss_type_matches_trl(loss_type, ref):
    batch = random_batch(DPO_LOSS_TYPES.index(loss_type))
    options = dict(loss_type=loss_type, beta=0.3, label_smoothing=smoothing_for(loss_type))
    if loss_type == "discopop":
        options["discopop_tau"] = 0.3  # not the default, so the option is exercised
    assert_matches(ours(batch, ref=ref, **options), trl(batch, ref=ref, **options), batch)


@pytest.mark.parametrize("loss_type,eps", [("exo_pair", 1e-3), ("exo_pair", 0.4),
                                           ("robust", 0.3), ("aot", 0.45),
                                           ("aot_unpaired", 0.25)])
def test_label_smoothing_matches_trl(loss_type, eps):
    batch = random_batch(100 + int(eps * 1000))
    options = dict(loss_type=loss_type, beta=0.2, label_smoothing=eps)
    assert_matches(ours(batch, **options), trl(batch, **options), batch)


# ---------------------------------------------------------------------- options


F_DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                 ("alpha_divergence", 0.2), ("alpha_divergence", 1.0)]


@pytest.mark.parametrize("divergence,alpha", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", DPO_F_DIVERGENCE_LOSS_TYPES)
def test_f_divergences_match_trl(loss_type, divergence, alpha):
    batch = random_batch(200 + DPO_LOSS_TYPES.index(loss_type))
    options = dict(loss_type=loss_type, beta=0.4, label_smoothing=smoothing_for(loss_type),
                   f_divergence_type=divergence, f_alpha_divergence_coef=alpha)
    # TRL's alpha-divergence clamps per dtype and knows no float64: compare in float32.
    dtype = "float32" if divergence == "alpha_divergence" else "float64"
    want = trl(batch, dtype=dtype, **options)
    assert_matches(ours(batch, **options), want, batch, rtol=RTOL if dtype == "float64" else 2e-5)


def test_alpha_divergence_clamp_matches_trl():
    """Large log-ratios hit TRL's float32 clamp of the exponent (no gradient past it)."""
    batch = random_batch(7)
    batch["ref_chosen"] = batch["ref_chosen"] + 40.0 * batch["chosen_mask"]  # h_c << 0
    options = dict(loss_type="sigmoid", beta=0.1, f_divergence_type="alpha_divergence",
                   f_alpha_divergence_coef=0.2)
    want = trl(batch, dtype="float32", **options)
    got = ours(batch, **options)
    assert_matches(got, want, batch, rtol=2e-5)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.35, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sft", "apo_zero", "aot",
                                       "sigmoid_norm", "nca_pair"])
def test_ld_alpha_matches_trl(loss_type, ld_alpha):
    """LD-DPO on the policy and (TRL's reference-model path) the per-token reference."""
    batch = random_batch(300 + DPO_LOSS_TYPES.index(loss_type))
    options = dict(loss_type=loss_type, beta=0.25, ld_alpha=ld_alpha,
                   label_smoothing=smoothing_for(loss_type))
    want = trl(batch, **options)
    assert_matches(ours(batch, **options), want, batch)
    # The trainer's way: the reference reduced once to [B] sums, then the same loss.
    assert_matches(ours(batch, ref="sums", **options), want, batch)


@pytest.mark.parametrize("ld_alpha", [None, 0.0, 0.6])
def test_ld_sequence_logps_match_trl_reference_reduction(ld_alpha):
    """Our LD-DPO sums against TRL's ``compute_ref_log_probs`` (which reduces a batch)."""
    from types import SimpleNamespace
    batch = random_batch(17, pairs=5, width=11)
    tokens = torch.tensor(np.concatenate([batch["chosen"], batch["rejected"]]))
    mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    inputs = {"input_ids": torch.zeros((10, 12), dtype=torch.long),
              "attention_mask": torch.ones((10, 12), dtype=torch.long),
              "completion_mask": torch.cat([torch.zeros((10, 1), dtype=torch.long),
                                            torch.tensor(mask, dtype=torch.long)], 1)}
    trainer = trl_dpo_stand_in(ld_alpha=ld_alpha)
    model = lambda **kwargs: SimpleNamespace(log_probs=tokens)
    want_c, want_r = trainer.compute_ref_log_probs(model, inputs)
    with jax.enable_x64(True):
        got_c, got_r = ld_sequence_logps(jnp.asarray(batch["chosen"]), jnp.asarray(batch["rejected"]),
                                         batch["chosen_mask"], batch["rejected_mask"], ld_alpha)
    np.testing.assert_allclose(np.asarray(got_c), want_c.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(got_r), want_r.numpy(), rtol=1e-12)
    if ld_alpha == 0.0:  # the check can fail: some tail was dropped
        assert not np.allclose(np.asarray(got_c) + np.asarray(got_r),
                               batch["chosen"].sum(1) + batch["rejected"].sum(1))


@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair", "ipo", "discopop", "apo_down",
                                       "sppo_hard", "sigmoid_norm"])
def test_wpo_weighting_matches_trl(loss_type):
    batch = random_batch(400 + DPO_LOSS_TYPES.index(loss_type))
    options = dict(loss_type=loss_type, beta=0.3)
    want = trl(batch, use_weighting=True, **options)
    assert_matches(ours(batch, use_weighting=True, **options), want, batch)
    unweighted = trl(batch, **options)
    assert abs(unweighted[0] - want[0]) > 1e-6  # the weights change the loss


def test_wpo_weighting_of_sft_follows_trl_lines():
    """TRL 1.16 raises on ``sft`` with ``use_weighting`` (its in-place ``*=`` on the
    expanded scalar); its lines (``DPOTrainer._compute_loss``, WPO branch) transcribed
    with a copy of the expanded loss give the NLL times the batch mean of ``w_c w_r``."""
    batch = random_batch(450)
    tok = torch.tensor(np.concatenate([batch["chosen"], batch["rejected"]]))
    sq = torch.tensor(np.concatenate([batch["chosen_sq"], batch["rejected_sq"]]))
    mask = torch.tensor(np.concatenate([batch["chosen_mask"], batch["rejected_mask"]]))
    chosen_tok, _ = tok.chunk(2, dim=0)
    chosen_mask, _ = mask.chunk(2, dim=0)
    per_sequence_loss = (-chosen_tok[chosen_mask.bool()].mean()).expand(6).clone()
    completion_lengths = mask.sum(dim=1).clamp_min(1)
    aligned_logps = (tok - sq) * mask
    weights = torch.exp(aligned_logps.sum(dim=1) / completion_lengths)
    chosen_weights, rejected_weights = weights.chunk(2, dim=0)
    per_sequence_loss *= chosen_weights * rejected_weights
    want = per_sequence_loss.mean().item()
    got = ours(batch, use_weighting=True, loss_type="sft")
    np.testing.assert_allclose(got[0], want, rtol=1e-10)
    assert abs(got[0] - ours(batch, loss_type="sft")[0]) > 1e-6


# ---------------------------------------------------------------------- combinations


COMBINATIONS = [
    # MPO: sigmoid + bco_pair + sft with the paper's weights.
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["robust", "exo_pair", "hinge"], loss_weights=[0.5, 1.5, 2.0],
         label_smoothing=0.1),
    dict(loss_type=["aot", "apo_down", "nca_pair", "sppo_hard", "aot_unpaired"],
         label_smoothing=0.05),
    dict(loss_type=["discopop", "sigmoid_norm", "ipo", "sft"], loss_weights=[1.0, -0.5, 0.3, 2.0],
         f_divergence_type="js_divergence", ld_alpha=0.5, discopop_tau=0.1),
    dict(loss_type=["sigmoid", "apo_zero", "ipo"], ld_alpha=0.2, use_weighting=True),
    dict(loss_type=["sigmoid", "sigmoid"], loss_weights=[0.25, 0.5]),
]


@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "+".join(o["loss_type"]))
def test_weighted_combinations_match_trl(options):
    batch = random_batch(500 + len(options["loss_type"]))
    options = dict(options, beta=0.2)
    use_weighting = options.pop("use_weighting", False)
    want = trl(batch, use_weighting=use_weighting, **options)
    got = ours(batch, use_weighting=use_weighting, **options)
    assert_matches(got, want, batch)
    # The weighted sum of the single losses.
    if not use_weighting:
        weights = options.get("loss_weights") or [1.0] * len(options["loss_type"])
        eps = options.get("label_smoothing", 0.0)
        single = sum(w * ours(batch, **dict(options, loss_type=t, loss_weights=None,
                                            label_smoothing=eps if smoothing_for(t) else 0.0))[0]
                     for t, w in zip(options["loss_type"], weights))
        np.testing.assert_allclose(got[0], single, rtol=1e-12)


# ---------------------------------------------------------------------- SimPO, CPO, ORPO


def _cpo_stand_in(**attributes):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    from references import _SingleProcessAccelerator

    class StandIn:
        cpo_loss = CPOTrainer.cpo_loss

    trainer = StandIn()
    defaults = dict(alpha=0.0, loss_type="sigmoid", simpo_gamma=0.5, beta=0.1,
                    label_smoothing=0.0, accelerator=_SingleProcessAccelerator())
    for key, value in {**defaults, **attributes}.items():
        setattr(trainer, key, value)
    return trainer


def _torch_tokens(batch):
    c = torch.tensor(batch["chosen"], requires_grad=True)
    r = torch.tensor(batch["rejected"], requires_grad=True)
    mc = torch.tensor(batch["chosen_mask"]).bool()
    mr = torch.tensor(batch["rejected_mask"]).bool()
    return c, r, mc, mr


def _trl_mean_logps(tokens, mask):
    # trl/experimental/cpo/cpo_trainer.py, CPOTrainer.get_batch_logps(average_log_prob=True):
    # (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (tokens * mask).sum(-1) / mask.sum(-1)


def _trl_chosen_nll(tokens, mask):
    # CPOTrainer.concatenated_forward / ORPOTrainer: nn.CrossEntropyLoss over the chosen
    # labels (mean over the tokens not ignored) = minus the mean chosen token log-prob.
    return -tokens[mask].mean()


@pytest.mark.parametrize("gamma,eps,nll_weight", [(0.5, 0.0, 0.0), (1.3, 0.2, 0.0),
                                                  (0.8, 0.0, 0.7)])
def test_simpo_and_cpo_simpo_match_trl(gamma, eps, nll_weight):
    """SimPO: TRL's ``CPOTrainer.cpo_loss`` with ``loss_type='simpo'`` on per-token means
    (``cpo_alpha`` 0); CPO-SimPO adds ``cpo_alpha`` times the chosen NLL (our ``sft``)."""
    batch = random_batch(600 + int(gamma * 10))
    beta = 2.0
    c, r, mc, mr = _torch_tokens(batch)
    trainer = _cpo_stand_in(loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps)
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(_trl_mean_logps(c, mc),
                                                                _trl_mean_logps(r, mr))
    loss = losses.mean() + nll_weight * _trl_chosen_nll(c, mc)
    loss.backward()
    options = dict(loss_type=["simpo", "sft"], loss_weights=[1.0, nll_weight], beta=beta,
                   simpo_gamma=gamma, label_smoothing=eps)
    got = ours(batch, ref="none", **options)
    np.testing.assert_allclose(got[0], loss.item(), rtol=RTOL)
    for g, w, m in ((got[1], c.grad.numpy(), mc.numpy()), (got[2], r.grad.numpy(), mr.numpy())):
        np.testing.assert_allclose(g[m], w[m], rtol=RTOL, atol=1e-12)
    assert np.abs(c.grad.numpy()).max() > 1e-4
    # The same with a reference given: SimPO ignores it.
    np.testing.assert_allclose(ours(batch, **options)[0], got[0], rtol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_cpo_is_reference_free_sigmoid_plus_sft(eps):
    """CPO: TRL's ``cpo_loss`` ('sigmoid', summed log-probs, label smoothing) + the NLL."""
    batch = random_batch(650)
    c, r, mc, mr = _torch_tokens(batch)
    trainer = _cpo_stand_in(loss_type="sigmoid", beta=0.1, label_smoothing=eps)
    losses, *_ = trainer.cpo_loss((c * mc).sum(-1), (r * mr).sum(-1))
    loss = losses.mean() + 1.0 * _trl_chosen_nll(c, mc)
    loss.backward()
    got = ours(batch, ref="none", loss_type=["sigmoid", "sft"], beta=0.1, label_smoothing=eps)
    np.testing.assert_allclose(got[0], loss.item(), rtol=RTOL)
    np.testing.assert_allclose(got[1][mc.numpy()], c.grad.numpy()[mc.numpy()], rtol=RTOL)
    np.testing.assert_allclose(got[2][mr.numpy()], r.grad.numpy()[mr.numpy()], rtol=RTOL)


@pytest.mark.parametrize("beta", [0.1, 0.8])
def test_orpo_matches_trl(beta):
    """ORPO: TRL's ``ORPOTrainer.odds_ratio_loss`` on per-token means; the full loss is
    ``nll - mean(beta log sigma(log odds))`` = our ``orpo + sft``. TRL computes the odds
    ratio in float32."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    from references import _SingleProcessAccelerator

    class StandIn:
        odds_ratio_loss = ORPOTrainer.odds_ratio_loss

    trainer = StandIn()
    trainer.beta, trainer.accelerator = beta, _SingleProcessAccelerator()
    batch = random_batch(700 + int(beta * 10))
    # Mean log-probs on both sides of -log 2, where log(1 - exp(p)) switches its formula.
    batch["chosen"] = batch["chosen"] * np.array([0.2, 1.0, 0.3, 1.0, 0.25, 1.0])[:, None]
    c, r, mc, mr = _torch_tokens(batch)
    losses, *_ = trainer.odds_ratio_loss(_trl_mean_logps(c, mc), _trl_mean_logps(r, mr))
    loss = _trl_chosen_nll(c, mc) - losses.mean()
    loss.backward()
    got = ours(batch, ref="none", loss_type=["orpo", "sft"], beta=beta)
    np.testing.assert_allclose(got[0], loss.item(), rtol=RTOL)
    for g, w, m in ((got[1], c.grad.numpy(), mc.numpy()), (got[2], r.grad.numpy(), mr.numpy())):
        np.testing.assert_allclose(g[m], w[m], rtol=RTOL, atol=1e-7)
    means = (batch["chosen"].sum(1) / batch["chosen_mask"].sum(1))
    assert (means < -np.log(2)).any() and (means > -np.log(2)).any()


# ---------------------------------------------------------------------- sums, checks


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_summed_inputs_with_lengths_equal_per_token_inputs(loss_type):
    """The ``[B]`` sums + lengths path gives what the per-token path gives."""
    batch = random_batch(800 + DPO_LOSS_TYPES.index(loss_type))
    options = dict(loss_type=loss_type, beta=0.3, label_smoothing=smoothing_for(loss_type))
    want = ours(batch, **options)
    with jax.enable_x64(True):
        sums = {k: jnp.asarray((batch[k] * batch[f"{k.removeprefix('ref_')}_mask"]).sum(1))
                for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")}
        loss, metrics = dpo_loss(sums["chosen"], sums["rejected"], sums["ref_chosen"],
                                 sums["ref_rejected"],
                                 chosen_lengths=jnp.asarray(batch["chosen_mask"].sum(1)),
                                 rejected_lengths=jnp.asarray(batch["rejected_mask"].sum(1)),
                                 **options)
    np.testing.assert_allclose(float(loss), want[0], rtol=1e-10)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(loss_type="bogus"), "loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights has 1 weights for 2"),
    (dict(loss_type=[]), "at least one"),
    (dict(loss_type="exo_pair"), "must be > 0 for loss_type 'exo_pair'"),
    (dict(loss_type=["hinge", "ipo"], label_smoothing=0.1), "label_smoothing must be 0"),
    (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "bco_pair"),
    (dict(f_divergence_type="kl"), "f_divergence_type"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(loss_weights=[float("nan")]), "loss_weights"),
])
def test_bad_options_fail_in_one_line(kwargs, needle):
    c = jnp.full((3,), -2.0)
    with pytest.raises(ValueError) as e:
        dpo_loss(c, c, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    config_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError) as e:
        DPOConfig(**config_kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_options_that_need_per_token_inputs_or_lengths():
    c = jnp.full((3,), -2.0)
    for kwargs, needle in ((dict(ld_alpha=0.5), "per-token"),
                           (dict(use_weighting=True), "per-token"),
                           (dict(loss_type="simpo"), "lengths"),
                           (dict(loss_type="sft"), "lengths")):
        with pytest.raises(ValueError, match=needle):
            dpo_loss(c, c, **kwargs)
    tokens, mask = jnp.full((3, 4), -1.0), jnp.ones((3, 4))
    with pytest.raises(ValueError, match="log_sum_sq"):
        dpo_loss(tokens, tokens, chosen_mask=mask, rejected_mask=mask, use_weighting=True)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(tokens, tokens, chosen_mask=mask[:, :3], rejected_mask=mask)
