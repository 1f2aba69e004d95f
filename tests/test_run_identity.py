"""A run's identity resolves ``mask_strategy="auto"`` to the strategy the run draws with,
so a checkpoint written before ``auto`` existed (``per_tensor``) still resumes."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.trainers import SparseConfig
from sparsejax.trainers.policy_run import PolicyRun
from sparsejax.trainers.updater import Updater


@dataclasses.dataclass
class _Cfg:
    steps: int = 3


def _identity(strategy: str) -> dict:
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)}
    run = PolicyRun()
    run.cfg, run.sparse_cfg = _Cfg(), SparseConfig(sparsity=0.75, mask_strategy=strategy)
    run.params = params
    run.updater = Updater(run.sparse_cfg, params)
    return run.identity()


def test_auto_without_a_mesh_is_identified_as_per_tensor():
    auto, old = _identity("auto"), _identity("per_tensor")
    assert auto["sparse"]["mask_strategy"] == "per_tensor"
    assert auto == old  # the same mask and settings: a per_tensor checkpoint resumes


@pytest.mark.parametrize("strategy", ["global", "row_balanced"])
def test_other_strategies_stay_distinct(strategy):
    assert _identity(strategy)["sparse"]["mask_strategy"] == strategy
    assert _identity(strategy) != _identity("auto")
