"""The Pallas sampled dense-dense product (``sparsejax.kernels.sampled_matmul``).

Interpret mode on CPU against the XLA path and a float64 reference (ragged entry and
token counts, float32 and bfloat16 inputs, both mask layouts through the sparse
backward), lowering for an abstract H100 with a negative control (a non-power-of-two
block passes in interpret mode but fails the Triton lowering), and ``gpu`` tests of
the compiled kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sparse_backward as sparse_grads
from sparsejax.backends import on_nvidia_gpu, sampled_product_fn, xla_sampled_product
from sparsejax.kernels import sampled_matmul as S
from sparsejax.models import ops
from sparsejax.optim.sparse import gather

H100 = dict(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)


def case(seed, n_in, n_out, tokens, k, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    xt = jnp.asarray(rng.normal(size=(n_in, tokens)), dtype)
    dyt = jnp.asarray(rng.normal(size=(n_out, tokens)), dtype)
    a = jnp.asarray(rng.integers(0, n_in, k), jnp.int32)
    b = jnp.asarray(rng.integers(0, n_out, k), jnp.int32)
    want = (np.asarray(xt, np.float64) @ np.asarray(dyt, np.float64).T)[np.asarray(a),
                                                                         np.asarray(b)]
    return xt, dyt, a, b, want


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


RAGGED = [  # (in, out, tokens, k, block_entries, block_tokens)
    (5, 7, 13, 1, 16, 16),  # one entry, tokens < block
    (13, 11, 37, 37, 16, 16),  # 3 entry blocks (ragged), 3 token tiles (ragged)
    (9, 9, 64, 64, 16, 32),  # multiples of both blocks
    (40, 3, 1, 100, 64, 16),  # a single token
    (6, 6, 20, 0, 16, 16),  # k = 0: nothing launched
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n_in,n_out,tokens,k,be,bt", RAGGED,
                         ids=[f"k{c[3]}-t{c[2]}-b{c[4]}x{c[5]}" for c in RAGGED])
def test_interpret_matches_xla(n_in, n_out, tokens, k, be, bt, dtype):
    xt, dyt, a, b, want = case(k + tokens, n_in, n_out, tokens, k, dtype)
    got = S.sampled_product(xt, dyt, a, b, interpret=True, block_entries=be,
                            block_tokens=bt)
    ref = xla_sampled_product(xt, dyt, a, b)
    assert got.shape == (k,) and got.dtype == jnp.float32
    if k:
        assert max_rel(got, ref) <= 1e-6
        assert max_rel(got, want) <= 1e-6  # float32 products of exact bf16 inputs


@pytest.mark.parametrize("layout", ["flat", "row_balanced"])
def test_backward_through_interpret_backend(layout):
    """``SparseWeight`` with ``backend="interpret"``: gradient = gather of the dense one."""
    rng = np.random.default_rng(1)
    n_in, n_out, c = 12, 20, 3
    w = jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 9, n_in)), jnp.float32)
    cols = np.sort(np.stack([rng.choice(n_out, c, replace=False) for _ in range(n_in)]), 1)
    idx = (cols + np.arange(n_in)[:, None] * n_out).astype(np.int32)
    idx = jnp.asarray(idx if layout == "row_balanced" else idx.reshape(-1)[::2])
    loss = lambda w_: jnp.sum(jnp.sin(ops.matmul(x, w_)))
    want = gather(jax.grad(loss)(w), idx)
    values = gather(w, idx)
    got = jax.grad(lambda v: loss(sparse_grads.SparseWeight(w, idx, v, False, "interpret")))(
        values)
    assert got.shape == idx.shape
    assert max_rel(got, want) <= 1e-5


def test_backend_switch_routes_to_kernel():
    xt, dyt, a, b, want = case(3, 8, 5, 11, 30)
    # The seam takes token-major operands ([T, in], [T, out]).
    assert max_rel(sampled_product_fn("interpret")(xt.T, dyt.T, a, b), want) <= 1e-6
    assert max_rel(sampled_product_fn("xla")(xt.T, dyt.T, a, b), want) <= 1e-6


def test_argument_checks():
    xt, dyt, a, b, _ = case(4, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="power of two"):
        S.sampled_product(xt, dyt, a, b, interpret=True, block_tokens=24)
    with pytest.raises(ValueError, match=r"\[in, T\]"):
        S.sampled_product(xt, dyt[:, :3], a, b, interpret=True)
    with pytest.raises(ValueError, match="equal"):
        S.sampled_product(xt, dyt, a, b[:3], interpret=True)


# ----------------------------------------------------------------------------- lowering


def lower_for_h100(fn, *args):
    device = jax.sharding.AbstractDevice(**H100)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def _st(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("n_in,n_out,tokens,k,dtype", [
    (896, 4864, 2048, 43_581, jnp.bfloat16),  # Qwen2.5-0.5B MLP kernel at 1%
    (896, 151_936, 1024, 1_361_346, jnp.float32),  # tied output matrix, one logits chunk
    (7, 5, 3, 9, jnp.float32),  # ragged everything
])
def test_lowers_for_h100(n_in, n_out, tokens, k, dtype):
    text = lower_for_h100(lambda x, d, a, b: S.sampled_product(x, d, a, b),
                          _st((n_in, tokens), dtype), _st((n_out, tokens), dtype),
                          _st((k,), jnp.int32), _st((k,), jnp.int32)).as_text()
    assert "__gpu$xla.gpu.triton" in text or "triton_kernel_call" in text


def test_lowering_negative_control():
    """A 48-entry block runs in interpret mode but fails the H100 lowering."""
    structs = [_st((100,), jnp.int32), _st((100,), jnp.int32), _st((10 * 50,), jnp.float32),
               _st((10 * 50,), jnp.float32)]
    bad = S._build_call(100, 50, block_entries=48, block_tokens=64, interpret=False)
    with pytest.raises(Exception, match="power of 2"):
        lower_for_h100(bad, *structs)
    good = S._build_call(100, 50, block_entries=64, block_tokens=64, interpret=False)
    lower_for_h100(good, *structs)
    xt, dyt, a, b, want = case(5, 10, 10, 50, 100)
    out = S._build_call(100, 50, block_entries=48, block_tokens=64, interpret=True)(
        a, b, xt.reshape(-1), dyt.reshape(-1))
    assert max_rel(out, want) <= 1e-6


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not on_nvidia_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n_in,n_out,tokens,k", [(13, 11, 37, 37), (896, 4864, 2048, 43_581),
                                                 (64, 151_936, 1024, 100_003)])
def test_pallas_on_gpu_matches_xla(n_in, n_out, tokens, k, dtype):
    xt, dyt, a, b, want = case(6, n_in, n_out, tokens, k, dtype)
    got = sampled_product_fn("pallas")(xt.T, dyt.T, a, b)
    assert max_rel(got, xla_sampled_product(xt, dyt, a, b)) <= 1e-5
    assert max_rel(got, want) <= 1e-5
