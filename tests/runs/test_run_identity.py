"""A run's identity resolves ``mask_strategy="auto"`` to the strategy the run draws with,
so a checkpoint written before ``auto`` existed (``per_tensor``) still resumes."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.runs.run import PolicyRun
from sparsejax.trainable import build_trainable
from sparsejax.trainers import TrainableConfig


@dataclasses.dataclass
class _Cfg:
    steps: int = 3


def _identity(strategy: str) -> dict:
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)}
    run = PolicyRun()
    run.cfg, run.trainable_cfg = _Cfg(), TrainableConfig(sparsity=0.75, mask_strategy=strategy)
    run.params = params
    run.trainable = build_trainable(run.trainable_cfg, params)
    return run.identity()


def test_auto_without_a_mesh_is_identified_as_per_tensor():
    auto, old = _identity("auto"), _identity("per_tensor")
    assert auto["trainable_config"]["mask_strategy"] == "per_tensor"
    assert auto == old  # the same mask and settings: a per_tensor checkpoint resumes


@pytest.mark.parametrize("strategy", ["global", "row_balanced"])
def test_other_strategies_stay_distinct(strategy):
    assert _identity(strategy)["trainable_config"]["mask_strategy"] == strategy
    assert _identity(strategy) != _identity("auto")
