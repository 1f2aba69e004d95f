"""Gradients of Qwen3-MoE: the routed block against a dense one-hot reference, the tiled
grouped matmul against ``jax.lax.ragged_dot``, remat policies and the load-balancing
loss, the sparse backward over stacked expert tensors (against the gathered dense
gradient), sparse AdamW steps, the expert axis on the fsdp mesh axis and bfloat16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoder_checks import forward, left_padded_batch
from flax import nnx

from sparsejax import masks
from sparsejax import sparse_backward as sparse_grads
from sparsejax.models import PRESETS, DecoderConfig, apply, moe
from sparsejax.models.decoder import apply_with_router_logits, init_model, reconfigure
from sparsejax.models.logprobs import completion_logprobs
from sparsejax.optim.sparse import gather

# ----------------------------------------------------------------------------- gradients


def _dense_reference(x, router, gate, up, down, k, norm):
    """The MoE block the plain way: every expert on every token, weighted by a one-hot
    routing matrix (zero for the experts a token is not routed to)."""
    logits = x @ router
    probs = jax.nn.softmax(logits, axis=-1)
    top = jax.lax.top_k(jax.lax.stop_gradient(probs), k)[1]
    chosen = jax.nn.one_hot(top, probs.shape[-1]).sum(axis=1)          # [N, E] 0/1
    weights = probs * chosen
    if norm:
        weights = weights / weights.sum(-1, keepdims=True)
    out = jnp.zeros_like(x)
    for e in range(gate.shape[0]):
        expert = (jax.nn.silu(x @ gate[e]) * (x @ up[e])) @ down[e]
        out = out + weights[:, e:e + 1] * expert
    return out, logits


@pytest.mark.parametrize("norm", [True, False])
def test_moe_block_gradients_equal_dense_one_hot_reference(norm):
    config = DecoderConfig(model_type="qwen3_moe", hidden_size=20, num_experts=7,
                           num_experts_per_tok=3, moe_intermediate_size=9,
                           norm_topk_prob=norm)
    block = moe.MoE(config, nnx.Rngs(3))
    graphdef, params = nnx.split(block)
    rng = np.random.default_rng(int(norm))
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.5, p.shape), jnp.float32),
                          params)
    x = jnp.asarray(rng.normal(size=(2, 11, 20)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(2, 11, 20)), jnp.float32)
    cot_logits = jnp.asarray(rng.normal(size=(22, 7)), jnp.float32)

    def ours(p, x):
        y, logits = nnx.merge(graphdef, p).with_router_logits(x)
        return jnp.sum(y * cot) + jnp.sum(logits * cot_logits)

    def reference(p, x):
        y, logits = _dense_reference(x.reshape(-1, 20), p["gate"]["kernel"][...],
                                     p["experts"]["gate_proj"][...],
                                     p["experts"]["up_proj"][...],
                                     p["experts"]["down_proj"][...], 3, norm)
        return jnp.sum(y.reshape(x.shape) * cot) + jnp.sum(logits * cot_logits)

    got_v, (got_p, got_x) = jax.jit(jax.value_and_grad(ours, (0, 1)))(params, x)
    want_v, (want_p, want_x) = jax.value_and_grad(reference, (0, 1))(params, x)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), atol=1e-5, rtol=1e-5)
    flat_want = jax.tree_util.tree_flatten_with_path(want_p)[0]
    for (path, w), g in zip(flat_want, jax.tree.leaves(got_p)):
        w, g = np.asarray(w), np.asarray(g)
        assert np.abs(w).max() > 0.1, masks.path_str(path)
        np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max(), rtol=0,
                                   err_msg=masks.path_str(path))
    # Every expert was used and got a gradient (a routing bug would leave some at zero).
    assert (np.abs(np.asarray(got_p["experts"]["down_proj"][...])).reshape(7, -1).max(1)
            > 0).all()


@pytest.mark.parametrize("rows,sizes", [
    (300, [0, 130, 1, 0, 100, 60, 0]),   # groups across tile borders, empty groups, tail rows
    (20, [5, 0, 15]), (50, [0, 0, 50])])
def test_tiled_grouped_matmul_equals_ragged_dot(rows, sizes):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.normal(size=(rows, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(len(sizes), 6, 5)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(rows, 5)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def loss(impl):
        return lambda x, w: jnp.sum(moe.grouped_matmul(x, w, group_sizes, impl=impl) * cot)

    got = jax.jit(jax.value_and_grad(loss("tiled"), (0, 1)))(x, w)
    want = jax.jit(jax.value_and_grad(loss("ragged"), (0, 1)))(x, w)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.abs(np.asarray(r)).max() > 0.1
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)
    # By hand: row r times its group's matrix, zero past the groups.
    y = np.asarray(moe.grouped_matmul(x, w, group_sizes, impl="tiled"))
    group = np.repeat(np.arange(len(sizes)), sizes)
    want_y = np.einsum("ri,rio->ro", np.asarray(x)[:len(group)], np.asarray(w)[group])
    np.testing.assert_allclose(y[:len(group)], want_y, atol=1e-5, rtol=1e-5)
    assert not y[len(group):].any()
    with pytest.raises(ValueError, match="impl must be"):
        moe.grouped_matmul(x, w, group_sizes, impl="dense")


def _random_params(config: DecoderConfig, seed: int):
    graphdef, params = nnx.split(init_model(config, seed))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(np.asarray(x, np.float32) + 0.3 * rng.normal(size=x.shape), x.dtype)
              for x in leaves]
    return graphdef, jax.tree.unflatten(treedef, leaves)


SMALL_MOE = DecoderConfig(model_type="qwen3_moe", vocab_size=71, hidden_size=24,
                          intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=8, num_experts=5, num_experts_per_tok=2,
                          moe_intermediate_size=12, norm_topk_prob=True, mlp_only_layers=(0,),
                          tie_word_embeddings=False)


def test_gradients_with_aux_loss_equal_under_every_remat_policy():
    graphdef, params = _random_params(SMALL_MOE, 4)
    rng = np.random.default_rng(4)
    tokens, mask = left_padded_batch(rng, SMALL_MOE.vocab_size, length=9)
    weights = jnp.asarray(rng.normal(size=tokens.shape + (SMALL_MOE.vocab_size,)), jnp.float32)

    def loss(p, g):
        logits, routers = apply_with_router_logits(g, p, jnp.asarray(tokens), jnp.asarray(mask))
        aux = moe.load_balancing_loss(routers, SMALL_MOE.num_experts_per_tok,
                                      jnp.asarray(mask))
        return jnp.sum(jax.nn.log_softmax(logits) * weights) + 10.0 * aux

    grads = {}
    for remat in ("none", "layer", "dots"):
        g = reconfigure(graphdef, params, remat=remat)
        grads[remat] = jax.jit(jax.grad(loss), static_argnums=1)(params, g)
    router = np.asarray(grads["none"]["layers"][1]["mlp"]["gate"]["kernel"][...])
    assert np.abs(router).max() > 1e-3
    for remat in ("layer", "dots"):
        for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat])):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max(), rtol=0)
    # The aux term reaches the router: without it the router's gradient differs.
    logits_only = jax.grad(lambda p: jnp.sum(jax.nn.log_softmax(apply(
        graphdef, p, jnp.asarray(tokens), jnp.asarray(mask))) * weights))(params)
    other = np.asarray(logits_only["layers"][1]["mlp"]["gate"]["kernel"][...])
    assert np.abs(other - router).max() > 1e-4


@pytest.mark.parametrize("strategy", ["per_tensor", "row_balanced"])
def test_sparse_backward_over_stacked_experts_matches_gather_of_dense_grad(strategy):
    graphdef, params = _random_params(SMALL_MOE, 12)
    mask = jax.tree.map(jnp.asarray, masks.random_mask(params, 0.6, seed=12,
                                                       strategy=strategy))
    experts = mask["layers"][1]["mlp"]["experts"]["gate_proj"][...]
    assert experts.size > 0
    if strategy == "row_balanced":  # every row of every expert holds the same count
        assert experts.shape == (5 * 24, round(0.4 * 12))
    rng = np.random.default_rng(12)
    pt = rng.integers(3, SMALL_MOE.vocab_size, (3, 6))
    pm = (np.arange(6)[None] >= np.array([[0], [2], [4]])).astype(np.int32)
    ct = rng.integers(3, SMALL_MOE.vocab_size, (3, 5))
    cm = (np.arange(5)[None] < np.array([[5], [3], [1]])).astype(np.int32)
    batch = [jnp.asarray(a) for a in (pt, pm, ct, cm)]
    weights = jnp.asarray(rng.normal(size=ct.shape), jnp.float32)

    def loss(p):
        logps = completion_logprobs(graphdef, p, *batch, chunk_size=4)
        return jnp.sum(logps * weights)

    @jax.jit
    def both(p, m):
        want_l, g = jax.value_and_grad(loss)(p)
        got_l, got = sparse_grads.value_and_grad(loss, p, m, backend="xla")
        return want_l, got_l, jax.tree.map(gather, g, m), got

    attached = sparse_grads.attach(params, mask, sparse_grads.compressed_values(params, mask))
    assert isinstance(attached["layers"][1]["mlp"]["experts"]["up_proj"][...],
                      sparse_grads.SparseExperts)
    want_l, got_l, want, got = both(params, mask)
    assert abs(float(got_l) - float(want_l)) <= 1e-5 * abs(float(want_l))
    names = set()
    for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
        w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
        assert g.shape == w.shape and np.abs(w).max() > 0, masks.path_str(path)
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max(), masks.path_str(path)
        names.add(masks.path_str(path))
    assert any("experts/down_proj" in n for n in names) and any("mlp/gate/" in n for n in names)


@pytest.mark.parametrize("rows,sizes,k", [(55, [0, 20, 3, 0, 27], 40), (30, [30, 0, 0, 0, 0], 150)])
def test_grouped_sampled_product_equals_gather_of_dense_weight_grad(monkeypatch, rows, sizes, k):
    monkeypatch.setattr(sparse_grads, "ROW_TILE", 8)      # several blocks of rows and of
    monkeypatch.setattr(sparse_grads, "ENTRY_CHUNK", 7)   # entries per expert
    rng = np.random.default_rng(k)
    x = rng.normal(size=(rows, 6)).astype(np.float32)
    dy = rng.normal(size=(rows, 5)).astype(np.float32)
    idx = np.sort(rng.choice(5 * 6 * 5, k, replace=False)).astype(np.int32)
    group = np.repeat(np.arange(5), sizes)
    dense = np.stack([x[:len(group)][group == e].T @ dy[:len(group)][group == e]
                      for e in range(5)])                  # [E, in, out]: dW per expert
    got = jax.jit(sparse_grads.grouped_sampled_product, static_argnums=4)(
        jnp.asarray(x), jnp.asarray(dy), jnp.asarray(sizes, jnp.int32), jnp.asarray(idx),
        (5, 6, 5))
    assert np.abs(dense.reshape(-1)[idx]).max() > 0.5
    np.testing.assert_allclose(np.asarray(got), dense.reshape(-1)[idx], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["per_tensor", "row_balanced"])
def test_sparse_adamw_steps_move_only_the_masked_expert_entries(strategy):
    from sparsejax.config import TrainableConfig
    from sparsejax.trainable import build_trainable
    graphdef, params = _random_params(SMALL_MOE, 21)
    trainable = build_trainable(TrainableConfig(sparsity=0.9, learning_rate=1e-2,
                                                mask_strategy=strategy,
                                                sparse_grads="on"), params)
    params = trainable.policy_params(params)
    opt_state = trainable.init(params)
    rng = np.random.default_rng(21)
    tokens, mask = left_padded_batch(rng, SMALL_MOE.vocab_size, length=8)
    before = jax.tree.map(np.asarray, params)

    def loss_fn(p):
        return -jnp.mean(completion_logprobs(graphdef, p, jnp.asarray(tokens[:, :4]),
                                             jnp.asarray(mask[:, :4]),
                                             jnp.asarray(tokens[:, 4:]),
                                             jnp.asarray(mask[:, 4:]))), None

    for _ in range(2):
        (_, _), grads = trainable.value_and_grad(loss_fn, params, opt_state)
        params, opt_state, report = trainable.apply(params, grads, opt_state)
    assert np.isfinite(float(report.grad_norm)) and not bool(report.skipped)
    entries = np.asarray(trainable.mask["layers"][1]["mlp"]["experts"]["down_proj"][...])
    old = before["layers"][1]["mlp"]["experts"]["down_proj"][...].reshape(-1)
    new = np.asarray(params["layers"][1]["mlp"]["experts"]["down_proj"][...]).reshape(-1)
    moved = np.flatnonzero(old != new)
    assert moved.size > 0 and np.isin(moved, entries.reshape(-1)).all()


def test_bfloat16_forward_is_close_to_float32():
    graphdef, params = _random_params(SMALL_MOE, 7)
    rng = np.random.default_rng(7)
    tokens, mask = left_padded_batch(rng, SMALL_MOE.vocab_size, length=10)
    ref = forward(graphdef, params, tokens, mask)
    g16, _ = nnx.split(nnx.eval_shape(lambda: init_model(SMALL_MOE.replace(
        param_dtype="bfloat16"))))
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = forward(g16, p16, tokens, mask)
    real = mask.astype(bool)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    scale = np.abs(ref[real]).max()
    assert np.abs(out[real] - ref[real]).max() < 0.1 * scale


def test_expert_stacks_are_split_over_fsdp_by_expert():
    from types import SimpleNamespace

    from sparsejax.parallel import sharding
    cfg = PRESETS["Qwen3-30B-A3B"]
    _, params = nnx.split(nnx.eval_shape(lambda: init_model(cfg.replace(num_layers=1))))
    experts = params["layers"][0]["mlp"]["experts"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        shape = experts[name].get_value().shape
        assert shape[0] == 128
        spec = sharding.leaf_spec(shape, 2, fsdp=8)
        assert tuple(spec) == ("fsdp", None, None), name  # 16 whole experts per device
        # A row-balanced mask ([E * in, c]) splits with it: rows e * in ... stay local.
        assert sharding.rows_local(SimpleNamespace(spec=spec))
    assert tuple(sharding.leaf_spec((cfg.hidden_size, 128), 2, fsdp=8)) == ("fsdp", None)
