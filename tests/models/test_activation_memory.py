"""Activation memory: chunked attention equals the full-score XLA attention (values and
gradients, f32), its compiled backward does not hold T x S scores, and per-layer
rematerialization gives the gradients of no remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.models import DecoderConfig
from sparsejax.models import decoder as dec
from sparsejax.models.attention import chunked_attention
from sparsejax.models.logprobs import token_logprobs

TOL = 1e-5


def _qkv(rng, b, t, s, h, kv, d):
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return f(b, t, h, d), f(b, s, kv, d), f(b, s, kv, d)


def _masks(rng, b, t, s):
    """Left-padded causal (ragged real lengths), a cache mask (queries at slot s - t),
    and a random mask with one row fully masked."""
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0] = t
    am = (np.arange(t)[None] >= (t - lengths)[:, None]).astype(np.int32)
    yield "causal_left_padded", dec.causal_padding_mask(jnp.asarray(am)), t
    valid = np.ones((b, s), bool)
    valid[1:, : s // 3] = False
    yield "cache", dec.cached_mask(jnp.asarray(valid), s - t, t), s
    m = rng.random((b, t, s)) < 0.4
    m[0, 2] = False
    yield "random_with_empty_row", jnp.asarray(m), s


CASES = [  # (b, t, s, heads, kv_heads, d, chunk_q, chunk_k)
    (2, 37, 53, 6, 2, 8, 8, 16),   # GQA 3, lengths not multiples of the chunks
    (3, 20, 29, 4, 4, 16, 32, 7),  # MHA, one query chunk, ragged key chunks
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}t{c[1]}s{c[2]}h{c[3]}k{c[4]}")
def test_chunked_attention_matches_full_scores(case):
    b, t, s, h, kv, d, cq, ck = case
    rng = np.random.default_rng(sum(case))
    q, k, v = _qkv(rng, b, t, s, h, kv, d)
    w = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    masks = list(_masks(rng, b, t, s))

    def values_and_grads(attn):
        """Per mask: the output and the gradients of a random projection of it."""
        def run(q, k, v, *mask_list):
            out = []
            for (_, _, width), mask in zip(masks, mask_list):
                loss = lambda q, k, v, mask=mask: jnp.sum(attn(q, k, v, mask) * w)
                kk, vv = k[:, :width], v[:, :width]
                out.append((attn(q, kk, vv, mask),
                            jax.grad(loss, argnums=(0, 1, 2))(q, kk, vv)))
            return out
        return jax.jit(run)(q, k, v, *[m for _, m, _ in masks])

    ref = values_and_grads(dec._xla_attention)
    out = values_and_grads(lambda q, k, v, m: chunked_attention(q, k, v, m, chunk_q=cq,
                                                                chunk_k=ck))
    for (name, _, _), (o, g), (o_ref, g_ref) in zip(masks, out, ref):
        np.testing.assert_allclose(o, o_ref, atol=TOL, rtol=TOL, err_msg=name)
        for which, a, r in zip("qkv", g, g_ref):
            assert float(jnp.max(jnp.abs(r))) > 0
            np.testing.assert_allclose(a, r, atol=TOL, rtol=TOL, err_msg=f"{name} d{which}")


def test_chunked_attention_rejects_bad_shapes():
    q, k, v = _qkv(np.random.default_rng(0), 1, 4, 4, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        chunked_attention(q, k, v, jnp.ones((1, 4, 4), bool))
    q, k, v = _qkv(np.random.default_rng(0), 1, 4, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="mask shape"):
        chunked_attention(q, k, v, jnp.ones((1, 4, 5), bool))


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_backward_memory_does_not_grow_with_t_times_s():
    """Compiled (not run) gradient at T = S = 2048: the full version holds float32
    [B, H, T, S] scores (32 MiB each); the chunked one only 256 x 256 blocks."""
    b, t, h, kv, d = 1, 2048, 2, 1, 16
    sds = jax.ShapeDtypeStruct
    args = (sds((b, t, h, d), jnp.float32), sds((b, t, kv, d), jnp.float32),
            sds((b, t, kv, d), jnp.float32), sds((b, t, t), jnp.bool_))

    def grad_of(attn):
        return jax.grad(lambda q, k, v, m: jnp.sum(attn(q, k, v, m) ** 2), argnums=(0, 1, 2))

    full = _temp_bytes(grad_of(dec._xla_attention), *args)
    chunked = _temp_bytes(grad_of(lambda q, k, v, m: chunked_attention(
        q, k, v, m, chunk_q=256, chunk_k=256)), *args)
    scores = b * h * t * t * 4
    assert full >= scores
    assert chunked < scores / 4, (chunked, scores)


def test_attention_dispatch_chunks_long_inputs_only():
    rng = np.random.default_rng(3)
    config = DecoderConfig(attention_impl="xla", attention_chunk_size=8)
    q, k, v = _qkv(rng, 2, 24, 24, 4, 2, 16)
    mask = dec.causal_padding_mask(jnp.ones((2, 24), jnp.int32))
    jaxpr = str(jax.make_jaxpr(lambda *a: dec.attention(config, *a))(q, k, v, mask))
    assert "custom_vjp" in jaxpr and "scan" in jaxpr
    np.testing.assert_allclose(dec.attention(config, q, k, v, mask),
                               dec._xla_attention(q, k, v, mask),
                               atol=TOL, rtol=TOL)
    # A decode step (one query against the cache) is one einsum, never chunked.
    one = jax.make_jaxpr(lambda *a: dec.attention(config, *a))(
        q[:, :1], k, v, mask[:, -1:])
    assert "scan" not in str(one)
    off = jax.make_jaxpr(lambda *a: dec.attention(config.replace(attention_chunk_size=0), *a))(
        q, k, v, mask)
    assert "scan" not in str(off)


@pytest.fixture(scope="module")
def tiny_gqa():
    config = DecoderConfig(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
                           hidden_size=48, intermediate_size=64, vocab_size=97,
                           qkv_bias=True, tie_word_embeddings=False, attention_impl="xla",
                           attention_chunk_size=4, remat="none")
    return nnx.split(dec.init_model(config, seed=1))


def test_remat_gives_the_gradients_of_no_remat(tiny_gqa):
    graphdef, params = tiny_gqa
    rng = np.random.default_rng(7)
    tokens = jnp.asarray(rng.integers(0, 97, size=(3, 11)), jnp.int32)
    am = np.ones((3, 11), np.int32)
    am[1, :4] = 0
    am[2, :9] = 0
    weights = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)

    def grads(remat):
        g = dec.reconfigure(graphdef, params, remat=remat)
        assert nnx.merge(g, params).config.remat == remat
        fn = lambda p: jnp.sum(token_logprobs(g, p, tokens, jnp.asarray(am)) * weights)
        return jax.jit(jax.value_and_grad(fn))(params)

    loss_ref, ref = grads("none")
    for remat in ("layer", "dots"):
        loss, out = grads(remat)
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out),
                                jax.tree.leaves(ref)):
            assert np.all(np.isfinite(a))
            scale = float(jnp.max(jnp.abs(b))) + 1e-30
            err = float(jnp.max(jnp.abs(a - b))) / scale
            assert err < TOL, (remat, jax.tree_util.keystr(path), err)


def test_remat_and_chunk_size_are_checked():
    with pytest.raises(ValueError, match="remat"):
        DecoderConfig(remat="everything")
    with pytest.raises(ValueError, match="attention_chunk_size"):
        DecoderConfig(attention_chunk_size=-1)
