"""The C++ CPU sampled-product kernel (``sparsejax.kernels.cpu_sampled_product``).

Against a float64 reference and the XLA path on fresh random inputs: ragged token
counts (shorter than a tile, not a multiple of it), a minor operand too wide for the
largest tile, ``k`` of 0 and 1, repeated entries, entries in any order, float32,
bfloat16 and mixed inputs, both operand orientations; an out-of-range entry is an
error; the backend switch uses the kernel on the CPU and the sparse backward's
gradient through it equals ``gather(jax.grad(dense))``; with the kernel switched off
the switch falls back to XLA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import sparse_backward as sparse_grads
from sparsejax.backends import sampled_product_fn, xla_sampled_product
from sparsejax.kernels import cpu_sampled_product as C
from sparsejax.models import ops
from sparsejax.optim.sparse import gather

pytestmark = pytest.mark.skipif(not C.available(),
                                reason="no C++ compiler here (the XLA fallback is tested)")


def case(seed, tokens, n_in, n_out, k, x_dtype=jnp.float32, dy_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(tokens, n_in)), x_dtype)
    dy = jnp.asarray(rng.normal(size=(tokens, n_out)), dy_dtype)
    a = rng.integers(0, n_in, k).astype(np.int32)
    b = rng.integers(0, n_out, k).astype(np.int32)
    want = (np.asarray(x, np.float64).T @ np.asarray(dy, np.float64))[a, b]
    return x, dy, jnp.asarray(a), jnp.asarray(b), want


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0 and b.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("tokens,n_in,n_out,k", [
    (1, 3, 5, 4),            # one token, far below a tile
    (37, 17, 19, 300),       # ragged everything
    (300, 64, 48, 2_000),    # x is the major operand (in > out), T past one tile
    (513, 40, 300, 9_000),   # dy major, several parts, T = 2 tiles + 1
    (70, 5_000, 4_600, 3_000),  # minor operand too wide for a 256-token tile
])
def test_matches_float64_and_xla(tokens, n_in, n_out, k):
    x, dy, a, b, want = case(tokens + k, tokens, n_in, n_out, k)
    got = jax.jit(C.sampled_product)(x, dy, a, b)
    assert got.dtype == jnp.float32 and got.shape == (k,)
    assert max_rel(got, want) <= 1e-6
    assert max_rel(got, xla_sampled_product(x.T, dy.T, a, b)) <= 1e-6


@pytest.mark.parametrize("x_dtype,dy_dtype", [(jnp.bfloat16, jnp.bfloat16),
                                              (jnp.bfloat16, jnp.float32),
                                              (jnp.float32, jnp.bfloat16)])
def test_bfloat16_inputs_sum_in_float32(x_dtype, dy_dtype):
    x, dy, a, b, want = case(3, 130, 24, 40, 500, x_dtype, dy_dtype)
    got = C.sampled_product(x, dy, a, b)
    assert max_rel(got, want) <= 1e-6  # the reference uses the same bf16 values


def test_empty_single_repeated_and_unsorted_entries():
    x, dy, _, _, _ = case(4, 50, 9, 7, 0)
    assert C.sampled_product(x, dy, jnp.zeros((0,), jnp.int32),
                             jnp.zeros((0,), jnp.int32)).shape == (0,)
    ref = np.asarray(x, np.float64).T @ np.asarray(dy, np.float64)
    a = jnp.asarray([8, 0, 8, 3, 8, 0], jnp.int32)  # repeats, not sorted
    b = jnp.asarray([6, 0, 6, 2, 1, 0], jnp.int32)
    got = np.asarray(C.sampled_product(x, dy, a, b))
    assert max_rel(got, ref[np.asarray(a), np.asarray(b)]) <= 1e-6
    assert got[0] == got[2] and got[1] == got[5]  # the same entry gives the same bits
    one = C.sampled_product(x, dy, a[:1], b[:1])
    assert np.asarray(one)[0] == got[0]


def test_zero_tokens_give_zeros():
    x = jnp.zeros((0, 4), jnp.float32)
    dy = jnp.zeros((0, 6), jnp.float32)
    got = C.sampled_product(x, dy, jnp.asarray([1, 2], jnp.int32), jnp.asarray([0, 5], jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np.zeros(2, np.float32))


def test_out_of_range_entry_is_an_error():
    x, dy, a, b, _ = case(5, 20, 6, 8, 10)
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(C.sampled_product(x, dy, a.at[3].set(6), b))
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(C.sampled_product(x, dy, a, b.at[0].set(-1)))


def test_argument_checks():
    x, dy, a, b, _ = case(6, 8, 4, 4, 3)
    with pytest.raises(ValueError, match=r"\[T, in\]"):
        C.sampled_product(x, dy[:5], a, b)
    with pytest.raises(ValueError, match="equal"):
        C.sampled_product(x, dy, a, b[:2])
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        C.sampled_product(x.astype(jnp.float16), dy, a, b)


def test_backend_switch_uses_the_kernel_and_the_sparse_backward_matches_dense():
    x, dy, a, b, want = case(7, 33, 12, 20, 60)
    f = jax.jit(sampled_product_fn("xla"))
    assert C.TARGET in f.lower(x, dy, a, b).as_text()
    assert max_rel(f(x, dy, a, b), want) <= 1e-6
    rng = np.random.default_rng(8)
    w = jnp.asarray(rng.normal(size=(12, 20)), jnp.float32)
    xs = jnp.asarray(rng.normal(size=(2, 9, 12)), jnp.float32)
    idx = jnp.asarray(np.sort(rng.choice(240, 31, replace=False)), jnp.int32)
    loss = lambda w_: jnp.sum(jnp.sin(ops.matmul(xs, w_)))
    got = jax.grad(lambda v: loss(sparse_grads.SparseWeight(w, idx, v, False, "xla")))(
        gather(w, idx))
    assert max_rel(got, gather(jax.grad(loss)(w), idx)) <= 1e-5


def test_switched_off_the_backend_falls_back_to_xla():
    code = ("import jax, jax.numpy as jnp\n"
            "from sparsejax.backends import sampled_product_fn\n"
            "from sparsejax.kernels import cpu_sampled_product as C\n"
            "x = jnp.ones((3, 4)); dy = jnp.ones((3, 5)); a = jnp.asarray([1, 3])\n"
            "f = jax.jit(sampled_product_fn('xla'))\n"
            "assert not C.available()\n"
            "assert C.TARGET not in f.lower(x, dy, a, a).as_text()\n"
            "print(f(x, dy, a, a))\n")
    env = {**os.environ, "SPARSEJAX_CPU_KERNELS": "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[3. 3.]" in out.stdout
