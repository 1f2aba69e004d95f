"""DPO-family loss on sequence log-probs: parity with TRL's own ``DPOTrainer._compute_loss``
(TRL 1.16). The whole family on per-token inputs is in ``test_dpo_family.py``.

TRL's method is called unbound on a minimal stand-in ``self`` with precomputed reference
log-probs and a stand-in model whose ``log_probs`` output carries the prepared sequence
log-probs (in the last completion position, zeros elsewhere, so their sum over the sequence
is exactly the prepared value). Loss, gradient w.r.t. the policy sequence log-probs and the
reward metrics TRL logs are compared in float64.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")

from sparsejax.losses import dpo_loss  # noqa: E402

from references import trl_dpo_stand_in  # noqa: E402


def _trl_dpo(chosen, rejected, ref_chosen, ref_rejected, lengths, *, loss_type, beta, label_smoothing):
    """Run TRL's loss; ``lengths`` is ``[2B]`` completion token counts (chosen rows first)."""
    pairs = len(chosen)
    width = int(lengths.max()) + 1
    completion_mask = torch.zeros((2 * pairs, width), dtype=torch.long)
    for row, n in enumerate(lengths):
        completion_mask[row, width - int(n):] = 1
    seq_logps = torch.tensor(np.concatenate([chosen, rejected]), dtype=torch.float64, requires_grad=True)

    def model(**kwargs):
        seq_len = width - 1
        per_token = torch.cat([torch.zeros((2 * pairs, seq_len - 1), dtype=torch.float64), seq_logps[:, None]], 1)
        return SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros((2 * pairs, seq_len), dtype=torch.float64),
            mean_logits=torch.zeros((2 * pairs, seq_len), dtype=torch.float64),
            is_top1=torch.zeros((2 * pairs, seq_len), dtype=torch.bool),
        )

    inputs = {
        "input_ids": torch.zeros((2 * pairs, width), dtype=torch.long),
        "attention_mask": torch.ones((2 * pairs, width), dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(ref_chosen, dtype=torch.float64),
        "ref_rejected_logps": torch.tensor(ref_rejected, dtype=torch.float64),
    }
    trainer = trl_dpo_stand_in(loss_types=[loss_type], beta=beta, label_smoothing=label_smoothing)
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    grad = seq_logps.grad.numpy()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), grad[:pairs], grad[pairs:], metrics


def _ours(chosen, rejected, ref_chosen, ref_rejected, **kwargs):
    with jax.enable_x64(True):
        def fn(c, r):
            return dpo_loss(c, r, ref_chosen, ref_rejected, **kwargs)

        (loss, metrics), (g_c, g_r) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
            jnp.asarray(chosen), jnp.asarray(rejected)
        )
        return float(loss), np.asarray(g_c), np.asarray(g_r), {k: float(v) for k, v in metrics.items()}


def _random_pairs(seed: int, pairs: int = 7):
    rng = np.random.default_rng(seed)
    chosen = -rng.uniform(5, 40, size=pairs)
    rejected = -rng.uniform(5, 40, size=pairs)
    ref_chosen = chosen + rng.normal(0, 3, size=pairs)
    ref_rejected = rejected + rng.normal(0, 3, size=pairs)
    lengths = rng.integers(1, 12, size=2 * pairs)
    return chosen, rejected, ref_chosen, ref_rejected, lengths


CASES = [
    ("sigmoid", 0.1, 0.0),
    ("sigmoid", 0.5, 0.0),
    ("hinge", 0.1, 0.0),
    ("hinge", 0.3, 0.0),
    ("ipo", 0.1, 0.0),
    ("ipo", 0.8, 0.0),
    ("robust", 0.1, 0.0),
    ("robust", 0.1, 0.1),
    ("robust", 0.4, 0.3),
]


@pytest.mark.parametrize("with_reference", [True, False], ids=["ref", "ref_free"])
@pytest.mark.parametrize("loss_type,beta,label_smoothing", CASES)
def test_dpo_loss_matches_trl(loss_type, beta, label_smoothing, with_reference):
    chosen, rejected, ref_chosen, ref_rejected, lengths = _random_pairs(len(loss_type) + int(beta * 10))
    if not with_reference:  # reference-free DPO == a reference that assigns log-prob 0
        ref_chosen, ref_rejected = np.zeros_like(chosen), np.zeros_like(rejected)
    pairs = len(chosen)
    kwargs = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing)
    if loss_type == "ipo":  # TRL length-normalises IPO's log-ratios by the completion token counts
        kwargs.update(chosen_lengths=jnp.asarray(lengths[:pairs]), rejected_lengths=jnp.asarray(lengths[pairs:]))
    ref_loss, ref_gc, ref_gr, ref_metrics = _trl_dpo(
        chosen, rejected, ref_chosen, ref_rejected, lengths,
        loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
    )
    refs = (ref_chosen, ref_rejected) if with_reference else (None, None)
    loss, g_c, g_r, metrics = _ours(chosen, rejected, *refs, **kwargs)
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g_c, ref_gc, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g_r, ref_gr, rtol=0, atol=1e-6)
    assert np.abs(ref_gc).max() > 1e-4
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=0, atol=1e-6, err_msg=key)


def test_ipo_without_lengths_uses_raw_log_ratios():
    """With one completion token per row TRL's length normalisation is the identity."""
    chosen, rejected, ref_chosen, ref_rejected, _ = _random_pairs(5)
    ones = np.ones(2 * len(chosen), dtype=int)
    ref_loss, ref_gc, ref_gr, _ = _trl_dpo(chosen, rejected, ref_chosen, ref_rejected, ones,
                                           loss_type="ipo", beta=0.2, label_smoothing=0.0)
    loss, g_c, g_r, _ = _ours(chosen, rejected, ref_chosen, ref_rejected, loss_type="ipo", beta=0.2)
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g_c, ref_gc, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g_r, ref_gr, rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_reference", [True, False], ids=["ref", "ref_free"])
@pytest.mark.parametrize("label_smoothing", [0.05, 0.3])
def test_conservative_dpo_label_smoothing_matches_trl(label_smoothing, with_reference):
    """cDPO: TRL 1.16's 'sigmoid' ignores label_smoothing, but its 'aot_unpaired' loss on a
    single pair (sorting one element is the identity) is exactly the label-smoothed sigmoid loss."""
    chosen, rejected, ref_chosen, ref_rejected, lengths = _random_pairs(11, pairs=4)
    if not with_reference:
        ref_chosen, ref_rejected = np.zeros_like(chosen), np.zeros_like(rejected)
    beta = 0.2
    for i in range(len(chosen)):
        one = lambda x, i=i: x[i:i + 1]
        ref_loss, ref_gc, ref_gr, _ = _trl_dpo(
            one(chosen), one(rejected), one(ref_chosen), one(ref_rejected), lengths[:2],
            loss_type="aot_unpaired", beta=beta, label_smoothing=label_smoothing,
        )
        refs = (one(ref_chosen), one(ref_rejected)) if with_reference else (None, None)
        loss, g_c, g_r, _ = _ours(one(chosen), one(rejected), *refs, loss_type="sigmoid", beta=beta,
                                  label_smoothing=label_smoothing)
        np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=1e-6)
        np.testing.assert_allclose(g_c, ref_gc, rtol=0, atol=1e-6)
        np.testing.assert_allclose(g_r, ref_gr, rtol=0, atol=1e-6)
    # and against a direct numpy computation of the whole batch
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    log_sig = lambda x: -np.logaddexp(0.0, -x)
    expected = np.mean(-(1 - label_smoothing) * log_sig(beta * delta) - label_smoothing * log_sig(-beta * delta))
    refs = (ref_chosen, ref_rejected) if with_reference else (None, None)
    loss, *_ = _ours(chosen, rejected, *refs, loss_type="sigmoid", beta=beta, label_smoothing=label_smoothing)
    np.testing.assert_allclose(loss, expected, rtol=1e-12)


def test_dpo_loss_validates_arguments():
    c = jnp.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(c, c, loss_type="kto")
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(c, jnp.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="both"):
        dpo_loss(c, c, c, None)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(c, c, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(c, c, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(c, c, beta=0.0)
