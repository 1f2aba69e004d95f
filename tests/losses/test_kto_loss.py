"""The KTO loss against TRL 1.16's own loss code, on per-token log-probs.

TRL's ``KTOTrainer._compute_loss`` runs itself (called unbound on a stand-in object with
the attributes it reads; a stand-in model returns the given per-token log-probs, the
reference comes as TRL's precomputed ``ref_logps``/``ref_KL_logps``). The mismatched
pairs of the KL estimate are built as TRL's ``_prepare_dataset`` builds them (its
``add_kl_completion_ids``: the completions rotated by one within the batch) and compared
with :func:`mismatched_index`. Loss, the gradient w.r.t. every completion token's
log-prob and TRL's logged metrics agree within 1e-5 relative on fresh random inputs, for
each loss type, with weights, with a KL estimate both above 0 and clamped at 0.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl.trainer.kto_trainer")

from sparsejax.config import KTOConfig  # noqa: E402
from sparsejax.config.names import KTO_LOSS_TYPES  # noqa: E402
from sparsejax.losses.kto import kto_loss  # noqa: E402
from sparsejax.trainers.kto_data import mismatched_index  # noqa: E402

RTOL = 1e-5
METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected")


def test_loss_types_are_trls():
    import dataclasses

    from trl.trainer.kto_config import KTOConfig as TRLConfig
    field = {f.name: f for f in dataclasses.fields(TRLConfig)}["loss_type"]
    assert tuple(field.metadata["choices"]) == KTO_LOSS_TYPES


def test_mismatched_pairs_are_trls_rotation():
    """TRL 1.16 ``KTOTrainer._prepare_dataset.add_kl_completion_ids`` (mapped with
    ``batched=True, batch_size=per_device_train_batch_size``), transcribed."""
    def add_kl_completion_ids(examples):  # trl/trainer/kto_trainer.py
        examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
        return examples

    rng = np.random.default_rng(7)
    order = rng.permutation(11)
    for batch in (2, 3, 4, 11):
        want = []
        for s in range(0, len(order), batch):
            want += add_kl_completion_ids({"completion_ids": list(order[s:s + batch])})[
                "KL_completion_ids"]
        assert mismatched_index(order, batch).tolist() == [int(x) for x in want]
    assert mismatched_index(np.arange(4), 4).tolist() == [3, 0, 1, 2]


class _Accelerator:
    num_processes = 1
    device = torch.device("cpu")

    def gather_for_metrics(self, tensor):
        return tensor


def trl_kto(batch: dict, *, loss_type: str, beta: float, desirable_weight: float,
            undesirable_weight: float):
    """TRL's ``KTOTrainer._compute_loss`` on per-token log-probs (float64): ``(loss,
    gradient w.r.t. the per-token log-probs, logged metrics)``."""
    from trl.trainer.kto_trainer import KTOTrainer

    n, width = batch["logps"].shape
    logps = torch.tensor(batch["logps"], dtype=torch.float64, requires_grad=True)
    kl_logps = torch.tensor(batch["kl_logps"], dtype=torch.float64)

    def model(input_ids, attention_mask=None, labels=None, fused_lm_head=True, **kwargs):
        # the main sequences are all 1s, the mismatched (KL) ones all 2s; as a causal LM's
        # log-probs of the next tokens, 0 where the label is -100
        values = logps if int(input_ids[0, 0]) == 1 else kl_logps
        values = values * (labels[:, 1:] != -100)
        return SimpleNamespace(log_probs=values, entropy=torch.zeros(n, width, dtype=torch.float64),
                               mean_logits=torch.zeros(n, width, dtype=torch.float64))

    model.training = True

    class StandIn:
        _compute_loss = KTOTrainer._compute_loss
        _compute_kl_logps = KTOTrainer._compute_kl_logps

    trainer = StandIn()
    trainer.model = model
    trainer.accelerator = _Accelerator()
    trainer.aux_loss_enabled = False
    trainer.precompute_ref_logps = True
    trainer.calculate_KL = loss_type != "apo_zero_unpaired"
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.desirable_weight, trainer.undesirable_weight = desirable_weight, undesirable_weight
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    pad = lambda m: torch.tensor(np.pad(m, ((0, 0), (1, 0))), dtype=torch.long)
    inputs = {
        "input_ids": torch.ones(n, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(n, width + 1, dtype=torch.long),
        "completion_mask": pad(batch["mask"]),
        "KL_input_ids": torch.full((n, width + 1), 2, dtype=torch.long),
        "KL_attention_mask": torch.ones(n, width + 1, dtype=torch.long),
        "KL_completion_mask": pad(batch["kl_mask"]),
        "label": torch.tensor(np.asarray(batch["label"], bool)),
        "ref_logps": torch.tensor(batch["ref"], dtype=torch.float64),
        "ref_KL_logps": torch.tensor(batch["ref_kl"], dtype=torch.float64),
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss.detach()), logps.grad.numpy(), metrics


def random_batch(seed: int, n: int = 6, width: int = 7, kl_shift: float = 0.0,
                 labels=None) -> dict:
    """Per-token log-probs (0 past each completion), uneven lengths, a nearby reference;
    the mismatched pairs are the completions rotated by one (the trainer's pairing)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, size=n)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    logps = -rng.uniform(0.05, 2.5, size=(n, width)) * mask
    ref_tokens = (logps + rng.normal(0, 0.4, size=(n, width))) * mask
    kl = mismatched_index(np.arange(n), n)
    kl_logps = -rng.uniform(0.05, 2.5, size=(n, width)) * mask[kl]
    ref_kl = (kl_logps.sum(1) + rng.normal(kl_shift, 0.5, size=n))
    label = rng.integers(0, 2, size=n).astype(bool) if labels is None else np.asarray(labels)
    return {"logps": logps, "mask": mask, "ref": ref_tokens.sum(1), "kl_logps": kl_logps,
            "kl_mask": mask[kl], "ref_kl": ref_kl, "label": label}


def ours(batch: dict, **options):
    with jax.enable_x64(True):
        def f(tokens):
            return kto_loss(tokens, jnp.asarray(batch["ref"]), jnp.asarray(batch["label"]),
                            mask=jnp.asarray(batch["mask"]),
                            policy_kl_logps=jnp.asarray(batch["kl_logps"]),
                            ref_kl_logps=jnp.asarray(batch["ref_kl"]),
                            kl_mask=jnp.asarray(batch["kl_mask"]), **options)

        (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(
            jnp.asarray(batch["logps"], jnp.float64))
        return float(loss), np.asarray(grad), {k: float(v) for k, v in metrics.items()}


CASES = [
    # (loss_type, beta, desirable_weight, undesirable_weight, KL shift of the reference)
    ("kto", 0.1, 1.0, 1.0, -3.0),    # the policy above the reference: z > 0
    ("kto", 0.7, 1.33, 0.8, -3.0),
    ("kto", 2.0, 0.6, 1.5, 3.0),     # z clamped at 0
    ("apo_zero_unpaired", 0.1, 1.0, 1.0, 0.0),
    ("apo_zero_unpaired", 1.5, 1.4, 0.7, -3.0),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("seed", [11, 12])
def test_loss_gradient_and_metrics_match_trl(case, seed):
    loss_type, beta, w_d, w_u, shift = case
    batch = random_batch(seed, kl_shift=shift, labels=[True, False, True, True, False, False])
    options = dict(loss_type=loss_type, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    want_loss, want_grad, want = trl_kto(batch, **options)
    got_loss, got_grad, got = ours(batch, **options)
    assert abs(want_loss) > 1e-3 and np.abs(want_grad).max() > 1e-4  # not a trivial case
    np.testing.assert_allclose(got_loss, want_loss, rtol=RTOL)
    np.testing.assert_allclose(got_grad, want_grad, rtol=RTOL, atol=1e-12)
    for key in METRICS:
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=1e-12, err_msg=key)
    if loss_type == "kto":  # the reference point is really exercised (and clamped)
        assert (want["kl"] > 0.5) == (shift < 0), want["kl"]


def test_one_sided_batches_match_trl():
    """A micro-batch of only desirable (or undesirable) examples: TRL logs no metric of
    the missing side; ours is NaN (the trainer leaves it out)."""
    for labels in ([True] * 6, [False] * 6):
        batch = random_batch(5, kl_shift=-2.0, labels=labels)
        options = dict(loss_type="kto", beta=0.3, desirable_weight=1.2, undesirable_weight=0.9)
        want_loss, want_grad, want = trl_kto(batch, **options)
        got_loss, got_grad, got = ours(batch, **options)
        np.testing.assert_allclose(got_loss, want_loss, rtol=RTOL)
        np.testing.assert_allclose(got_grad, want_grad, rtol=RTOL, atol=1e-12)
        side = "chosen" if labels[0] else "rejected"
        other = "rejected" if labels[0] else "chosen"
        for key in (f"rewards/{side}", f"logps/{side}", "kl"):
            np.testing.assert_allclose(got[key], want[key], rtol=RTOL, err_msg=key)
        assert f"rewards/{other}" not in want and np.isnan(got[f"rewards/{other}"])
        assert "rewards/margins" not in want and np.isnan(got["rewards/margins"])


def test_kl_estimate_is_a_constant():
    """No gradient flows through the mismatched pairs' log-probs."""
    batch = random_batch(3, kl_shift=-3.0)
    with jax.enable_x64(True):
        grad = jax.grad(lambda kl: kto_loss(
            jnp.asarray(batch["logps"]), jnp.asarray(batch["ref"]), batch["label"],
            mask=batch["mask"], policy_kl_logps=kl, ref_kl_logps=batch["ref_kl"],
            kl_mask=batch["kl_mask"])[0])(jnp.asarray(batch["kl_logps"]))
    assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("options,needle", [
    (dict(loss_type="bco"), "loss_type"),
    (dict(beta=0.0), "beta"),
    (dict(desirable_weight=-1.0), "desirable_weight"),
    (dict(desirable_weight=0.0, undesirable_weight=0.0), "both 0"),
    (dict(micro_batch_size=1, batch_size=4), "micro_batch_size must be >= 2"),
    (dict(batch_size=6, micro_batch_size=4), "multiple"),
])
def test_bad_options_fail_in_one_line(options, needle):
    with pytest.raises(ValueError) as e:
        KTOConfig(**options)
    assert needle in str(e.value) and "\n" not in str(e.value)
    KTOConfig(loss_type="apo_zero_unpaired", micro_batch_size=1, batch_size=4)  # no KL: fine
