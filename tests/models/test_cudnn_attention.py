"""cuDNN fused attention against the decoder's XLA attention.

The decoder's ``attention`` calls ``jax.nn.dot_product_attention(implementation="cudnn")``
on a GPU for bf16/fp16 (``attention_impl="auto"``). Tests marked ``gpu`` check, on fresh
random bf16 inputs with the decoder's own masks (causal + left padding, GQA), that the
cuDNN output and its gradients match a float32 XLA reference, are finite everywhere (pad
rows included: a NaN there would reach every gradient through the backward pass), that the
compiled program really calls cuDNN, and that a whole decoder gives the same logits with
``"cudnn"`` and ``"xla"``. They skip without an NVIDIA GPU.

The CPU tests run the same comparison harness on the XLA paths, and show that it fails
for an attention that ignores the mask (so the GPU tests can fail).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.backends import on_nvidia_gpu
from sparsejax.models import decoder as D
from sparsejax.models.config import DecoderConfig

gpu_only = pytest.mark.skipif(not on_nvidia_gpu(), reason="needs an NVIDIA GPU")
BF16_TOL = 1e-2  # relative (Frobenius) error of bf16 operands against a float32 reference
# (batch, tokens, query heads, kv heads, head dim): Qwen2.5-0.5B / Llama-3 head layouts
SHAPES = [(2, 128, 14, 2, 64), (3, 200, 32, 8, 128), (1, 64, 4, 4, 64)]


def cudnn_attention(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")


def make_case(seed: int, b: int, t: int, h: int, kv: int, d: int, dtype=jnp.bfloat16):
    """Random q, k, v; the decoder's causal + left-padding mask; the real query rows."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype)
               for s in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d)))
    attn = np.ones((b, t), np.int32)
    for i in range(b):
        attn[i, :int(rng.integers(0, t // 2))] = 0  # left padding of random length
    return q, k, v, D.causal_padding_mask(jnp.asarray(attn)), attn.astype(bool)


def rel_err(got, want, rows) -> float:
    """``||got - want|| / ||want||`` over the real query rows ``rows [B, T]``."""
    got = np.asarray(got, np.float64)[rows]
    want = np.asarray(want, np.float64)[rows]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def reference(q, k, v, mask):
    """The decoder's full-score XLA attention in float32 on the same (rounded) inputs."""
    f32 = lambda x: x.astype(jnp.float32)
    return D._xla_attention(f32(q), f32(k), f32(v), mask)


def check_forward_and_grads(fn, case, tol):
    """``fn`` vs :func:`reference`: outputs and q/k/v gradients, finite everywhere."""
    q, k, v, mask, rows = case
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    weight = w * jnp.asarray(rows, jnp.float32)[:, :, None, None]  # pads carry no loss

    def loss(f, q_, k_, v_):
        return jnp.sum(f(q_, k_, v_, mask).astype(jnp.float32) * weight)

    out = jax.jit(fn)(q, k, v, mask)
    want = reference(q, k, v, mask)
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all()), "non-finite attention output"
    err = rel_err(out, want, rows)
    assert err <= tol, f"output relative error {err:.2e} > {tol}"
    grads = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
    want_grads = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(
        *(x.astype(jnp.float32) for x in (q, k, v)))
    for name, g, gw in zip("qkv", grads, want_grads):
        g = g.astype(jnp.float32)
        assert bool(jnp.isfinite(g).all()), f"non-finite d{name}"
        # q gradients live on query rows; k/v gradients on every key slot
        sel = rows if name == "q" else np.ones(rows.shape, bool)
        err = rel_err(g, gw, sel)
        assert err <= 2 * tol, f"d{name} relative error {err:.2e} > {2 * tol}"


# ----------------------------------------------------------------------------- CPU


def test_harness_accepts_the_xla_path():
    """The decoder's bf16 XLA attention passes the harness the GPU tests use."""
    check_forward_and_grads(D._xla_attention, make_case(0, 2, 40, 4, 2, 16),
                            BF16_TOL)


def test_harness_rejects_an_attention_that_ignores_the_mask():
    case = make_case(1, 2, 40, 4, 2, 16)
    unmasked = lambda q, k, v, m: D._xla_attention(
        q, k, v, jnp.ones_like(m))
    with pytest.raises(AssertionError, match="relative error"):
        check_forward_and_grads(unmasked, case, BF16_TOL)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("b,t,h,kv,d", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.gpu
@gpu_only
def test_cudnn_matches_xla_attention(b, t, h, kv, d, dtype):
    case = make_case(10 + t + h, b, t, h, kv, d, dtype)
    check_forward_and_grads(cudnn_attention, case, BF16_TOL)
    # the decoder's XLA path in the same dtype meets the same bound (the bound is fair)
    check_forward_and_grads(D._xla_attention, case, BF16_TOL)


@pytest.mark.gpu
@gpu_only
def test_compiled_program_calls_cudnn():
    q, k, v, mask, _ = make_case(3, 2, 128, 14, 2, 64)
    text = jax.jit(cudnn_attention).lower(q, k, v, mask).compile().as_text()
    assert "cudnn" in text.lower(), "no cuDNN custom call in the compiled attention"


def _tiny_config(impl: str) -> DecoderConfig:
    return DecoderConfig(model_type="qwen2", vocab_size=512, hidden_size=256,
                         intermediate_size=512, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=64, qkv_bias=True, param_dtype="bfloat16",
                         attention_impl=impl)


@pytest.mark.gpu
@gpu_only
def test_auto_uses_cudnn_on_gpu_without_fallback():
    config = _tiny_config("auto")
    q = jnp.zeros((1, 16, 4, 64), jnp.bfloat16)
    assert D._cudnn_applies(config, q)
    case = make_case(4, 1, 16, 4, 2, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the auto path warns when it falls back to XLA
        jax.jit(lambda *a: D.attention(config, *a)).lower(*case[:4]).compile()


@pytest.mark.gpu
@gpu_only
def test_decoder_logits_cudnn_vs_xla():
    graphdef, params = nnx.split(D.init_model(_tiny_config("cudnn"), seed=0))
    xla_graphdef = D.reconfigure(graphdef, params, attention_impl="xla")
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, 512, (3, 96)), jnp.int32)
    attn = np.ones((3, 96), np.int32)
    attn[0, :30], attn[2, :7] = 0, 0
    attn = jnp.asarray(attn)
    got = jax.jit(D.apply, static_argnums=0)(graphdef, params, tokens, attn)
    want = jax.jit(D.apply, static_argnums=0)(xla_graphdef, params, tokens, attn)
    assert bool(jnp.isfinite(got).all())
    err = rel_err(got, want, np.asarray(attn, bool))
    assert err <= 2e-2, f"logits relative error {err:.2e}"
