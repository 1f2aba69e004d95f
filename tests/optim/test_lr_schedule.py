"""Learning-rate schedules (``TrainableConfig.lr_scheduler_type``, ``warmup_steps``,
``warmup_ratio``) against transformers' ``get_scheduler``, and through every optimizer.

The reference is transformers' own scheduler on a torch optimizer: the learning rate of
optimizer step ``k`` (from 0) is the optimizer's after ``k`` scheduler steps. Warm-up
ratios resolve with transformers' ``TrainingArguments.get_warmup_steps`` (where a
``warmup_steps`` below 1 is the ratio). Through the sparse, full and LoRA trainables a
constant gradient makes AdamW's step ``lr_k * g / (|g| + eps)``, so each step's change of
the trained values reads back the learning rate it used; a trainable built afresh on the
saved optimizer state continues the schedule where it stopped.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax import lora
from sparsejax.config import TrainableConfig
from sparsejax.models.config import DecoderConfig
from sparsejax.models.decoder import init_model
from sparsejax.trainable import build_trainable
from sparsejax.trainable.base import learning_rate_schedule
from sparsejax.trainable.lora import LoraAdapter

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_NAME = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def hf_learning_rates(kind: str, lr: float, total: int, *, warmup_steps: int = 0,
                      warmup_ratio: float = 0.0) -> np.ndarray:
    """transformers' learning rate of steps 0..total (inclusive)."""
    hf_warmup = warmup_ratio if warmup_ratio > 0 else warmup_steps
    warmup = transformers.TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=hf_warmup), total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = transformers.get_scheduler(HF_NAME[kind], opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.asarray(out)


@pytest.mark.parametrize("warmup", [dict(), dict(warmup_steps=4), dict(warmup_ratio=0.15), dict(warmup_steps=1)])
@pytest.mark.parametrize("total", [1, 25])
@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_matches_transformers_get_scheduler(kind, total, warmup):
    lr = 3e-4
    cfg = TrainableConfig(learning_rate=lr, lr_scheduler_type=kind, **warmup)
    # the step counts as the optimizers keep them (int32), all at once
    counts = jnp.arange(total + 1, dtype=jnp.int32)
    got = np.broadcast_to(np.asarray(learning_rate_schedule(cfg, total)(counts), np.float64), counts.shape)
    want = hf_learning_rates(kind, lr, total, **warmup)
    # optax evaluates in float32: 1e-7 of the peak rate near the end of the cosine
    np.testing.assert_allclose(got[:total], want[:total], rtol=1e-5, atol=1e-7 * lr)
    warmup_len = transformers.TrainingArguments.get_warmup_steps(
        SimpleNamespace(warmup_steps=warmup.get("warmup_ratio", warmup.get("warmup_steps", 0))), total)
    if kind != "constant" and warmup_len < total:
        assert want[total] == 0.0 and 0.0 <= got[total] <= 1e-7 * lr  # the decay ends at 0, not below
        assert (got >= 0).all()
    if total > 1 and (kind != "constant" or warmup_len > 1):
        assert len(set(np.round(want / lr, 6))) > 2  # the schedule moves: the check is not vacuous


def test_constant_without_warmup_is_transformers_constant():
    cfg = TrainableConfig(learning_rate=1e-4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = transformers.get_scheduler("constant", opt)
    for k in range(5):
        assert float(learning_rate_schedule(cfg)(k)) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-7)
        opt.step()
        sched.step()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        TrainableConfig(lr_scheduler_type="polynomial")
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainableConfig(warmup_ratio=1.5)
    with pytest.raises(ValueError, match="both"):
        TrainableConfig(warmup_steps=3, warmup_ratio=0.1)
    for cfg in (TrainableConfig(lr_scheduler_type="cosine"), TrainableConfig(warmup_ratio=0.1)):
        with pytest.raises(ValueError, match="total_steps"):
            learning_rate_schedule(cfg)


# ------------------------------------------------------------------- through the optimizers

TOTAL, LR = 10, 0.5


@functools.cache
def _model_params():
    config = DecoderConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=8, remat="none")
    return nnx.split(init_model(config, seed=4))[1]


def _model():
    """A fresh copy (the steps donate what they are given)."""
    return jax.tree.map(jnp.copy, _model_params())


def _trainable(kind: str, cfg: TrainableConfig, base):
    if kind == "lora":
        lcfg = lora.LoraConfig(rank=2, alpha=4)
        return LoraAdapter(cfg, base, lcfg, adapters=lora.init_adapters(base, lcfg, seed=5), total_steps=TOTAL)
    return build_trainable(cfg, base, total_steps=TOTAL)


def _values(up, params, opt_state) -> np.ndarray:
    tree = up.checkpoint_tree(params, opt_state)
    return np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x in jax.tree.leaves(tree.get("active_values", tree.get("params")))])


@pytest.mark.parametrize("kind", ["full", "sparse", "lora"])
def test_every_optimizer_steps_with_the_schedule_and_resumes_it(kind):
    cfg = TrainableConfig(sparsity=0.0 if kind == "full" else 0.5, learning_rate=LR, weight_decay=0.0,
                          max_grad_norm=None, lr_scheduler_type="cosine", warmup_steps=3, sparse_grads="off")
    base = _model()
    up = _trainable(kind, cfg, base)
    params = up.policy_params(base)
    state = up.init(params)
    want = hf_learning_rates("cosine", LR, TOTAL, warmup_steps=3)[:TOTAL]
    got, resumed_at = [], 6
    for k in range(TOTAL):
        if k == resumed_at:  # a new trainable on the saved state: the schedule goes on from its count
            up = _trainable(kind, cfg, base)
        before = _values(up, params, state)
        grads = up.compress(jax.tree.map(jnp.ones_like, params), state)  # a constant gradient of 1
        params, state, report = up.apply(params, grads, state)
        assert not bool(report.skipped)
        step = before - _values(up, params, state)  # lr_k / (1 + eps) on every trained value
        assert step.size > 0
        got.append(step)
    for k, step in enumerate(got):
        np.testing.assert_allclose(step, want[k] / (1 + 1e-8), rtol=1e-4, atol=2e-6, err_msg=f"step {k}")
    assert want[0] == 0.0 and want.max() == pytest.approx(LR) and 0 < want[-1] < 0.1 * LR
