"""Per-layer remat saves memory on a CPU once the jobs' XLA option is set
(:mod:`sparsejax.xla_flags`), and still gives the gradients of no remat; the option is
added once, only for a CPU run, and never over the user's own pass list."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparsejax import xla_flags

# Compiles a small decoder's loss gradient with and without per-layer remat and prints
# XLA's temporary bytes of each and the largest gradient difference.
PROGRAM = r"""
import json, sys
from sparsejax.xla_flags import keep_optimization_barriers
if sys.argv[1] == "keep":
    keep_optimization_barriers()
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from sparsejax.models import DecoderConfig
from sparsejax.models import decoder as dec
from sparsejax.models.logprobs import token_logprobs
config = DecoderConfig(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                       hidden_size=64, intermediate_size=192, vocab_size=300,
                       attention_impl="xla", remat="none")
graphdef, params = nnx.split(dec.init_model(config, seed=3))
rng = np.random.default_rng(5)
tokens = jnp.asarray(rng.integers(0, 300, size=(4, 160)), jnp.int32)
mask = jnp.asarray(np.arange(160)[None] >= rng.integers(0, 40, size=(4, 1)), jnp.int32)
weights = jnp.asarray(rng.normal(size=(4, 159)), jnp.float32)
out = {}
for remat in ("none", "layer"):
    g = dec.reconfigure(graphdef, params, remat=remat)
    fn = jax.jit(jax.grad(lambda p: jnp.sum(token_logprobs(g, p, tokens, mask) * weights)))
    compiled = fn.lower(params).compile()
    out[remat] = (compiled.memory_analysis().temp_size_in_bytes, compiled(params))
err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
          for a, b in zip(jax.tree.leaves(out["layer"][1]), jax.tree.leaves(out["none"][1])))
print(json.dumps({"temp_none": out["none"][0], "temp_layer": out["layer"][0], "err": err}))
"""


def run_program(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env, check=True,
                          capture_output=True, text=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_layer_remat_saves_memory_on_cpu_only_with_the_option():
    kept, default = run_program("keep"), run_program("default")
    # XLA's CPU default merges the recomputed layers back: remat saves (almost) nothing.
    assert default["temp_layer"] > 0.7 * default["temp_none"], default
    # With the barriers kept, only each layer's input outlives the forward pass.
    assert kept["temp_layer"] < 0.5 * kept["temp_none"], kept
    assert kept["temp_none"] == pytest.approx(default["temp_none"], rel=0.01)
    for result in (kept, default):
        assert result["err"] < 1e-5, result


def test_option_is_added_once_for_cpu_runs_only(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_flags.runs_on_cpu()
    assert xla_flags.keep_optimization_barriers()
    assert xla_flags.keep_optimization_barriers()
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                               xla_flags.KEEP_BARRIERS_FLAG]
    # The user's own list of disabled passes stands.
    monkeypatch.setenv("XLA_FLAGS", "--xla_disable_hlo_passes=algsimp")
    assert not xla_flags.keep_optimization_barriers()
    assert os.environ["XLA_FLAGS"] == "--xla_disable_hlo_passes=algsimp"
    # A GPU run keeps XLA's GPU pipeline as it is.
    for platforms in ("cuda", "cuda,cpu"):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        monkeypatch.delenv("XLA_FLAGS", raising=False)
        assert not xla_flags.runs_on_cpu()
        assert not xla_flags.keep_optimization_barriers()
        assert "XLA_FLAGS" not in os.environ


@pytest.mark.parametrize("installed, expected", [([], True), (["xla_cuda12"], False),
                                                 (["some_tpu_plugin"], True)])
def test_gpu_plugins_decide_when_jax_platforms_is_unset(monkeypatch, installed, expected):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)

    class EntryPoint:
        def __init__(self, name):
            self.name = name

    monkeypatch.setattr(xla_flags.importlib.metadata, "entry_points",
                        lambda group: [EntryPoint(n) for n in installed])
    monkeypatch.setattr(xla_flags.importlib.util, "find_spec", lambda name: None)
    assert xla_flags.runs_on_cpu() is expected
