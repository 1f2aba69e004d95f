"""The sparse backward (sparsejax.sparse_backward): gradients only at the active entries.

Parity against ``gather(jax.grad(dense))`` on tiny random Qwen2/Llama decoders (biases,
GQA, tied and untied embeddings, both mask layouts, left-padded batches, a tensor with
no active entry), the compiled HLO (no dot produces a masked kernel's ``[in, out]``
gradient; negative control on the dense path), and whole GRPO / DPO steps with
``sparse_grads`` on vs off.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax import masks
from sparsejax import sparse_backward as sparse_grads
from sparsejax.backends import xla_sampled_product
from sparsejax.models import ops
from sparsejax.models.config import DecoderConfig
from sparsejax.models.decoder import init_model
from sparsejax.models.logprobs import completion_logprobs
from sparsejax.optim.sparse import gather
from sparsejax.trainable import build_trainable
from sparsejax.trainers import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, TrainableConfig

from paths import SHARED

REL = 1e-5
TOKENIZER = SHARED / "tokenizers" / "qwen2.5"

CASES = {  # name: (config, mask strategy)
    "qwen2_tied_bias_flat": (dict(model_type="qwen2", vocab_size=101, hidden_size=48,
                                  intermediate_size=64, num_heads=6, num_kv_heads=2,
                                  head_dim=8, qkv_bias=True, tie_word_embeddings=True),
                             "per_tensor"),
    "qwen2_untied_bias_rows": (dict(model_type="qwen2", vocab_size=83, hidden_size=40,
                                    intermediate_size=72, num_heads=5, num_kv_heads=1,
                                    head_dim=16, qkv_bias=True, tie_word_embeddings=False),
                               "row_balanced"),
    "llama_gqa_untied_flat": (dict(model_type="llama", vocab_size=97, hidden_size=48,
                                   intermediate_size=80, num_heads=6, num_kv_heads=2,
                                   head_dim=8, tie_word_embeddings=False), "global"),
    "llama_tied_biases_rows": (dict(model_type="llama", vocab_size=89, hidden_size=40,
                                    intermediate_size=56, num_heads=5, num_kv_heads=5,
                                    head_dim=12, tie_word_embeddings=True, o_bias=True,
                                    mlp_bias=True), "row_balanced"),
}


def random_model(cfg: dict, seed: int, dtype: str = "float32"):
    """A tiny decoder with every parameter random (biases and norms too)."""
    config = DecoderConfig(num_layers=1, param_dtype=dtype, **cfg)
    graphdef, params = nnx.split(init_model(config, seed))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(np.asarray(x, np.float32) + 0.3 * rng.normal(size=x.shape),
                          x.dtype) for x in leaves]
    return config, graphdef, jax.tree.unflatten(treedef, leaves)


def left_padded(rng, vocab, batch=3, prompt=6, completion=5):
    pt = rng.integers(3, vocab, (batch, prompt))
    pm = (np.arange(prompt)[None] >= rng.integers(0, prompt - 1, (batch, 1))).astype(np.int32)
    pm[0] = 1
    ct = rng.integers(3, vocab, (batch, completion))
    cm = (np.arange(completion)[None] < rng.integers(1, completion + 1, (batch, 1)))
    return [jnp.asarray(a) for a in (pt, pm, ct, cm.astype(np.int32))]


def loss_fn(graphdef, batch, weights):
    def loss(p):
        logps, ent = completion_logprobs(graphdef, p, *batch, chunk_size=4,
                                         return_entropy=True)
        return jnp.sum(logps * weights) + 0.1 * jnp.sum(ent), {"n": jnp.sum(batch[3])}
    return loss


def max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def empty_one_kernel(mask):
    """The first layer's k_proj gets no active entry (no weight-gradient work)."""
    mask["layers"][0]["attn"]["k_proj"]["kernel"].set_value(np.zeros((0,), np.int32))
    return mask


@pytest.mark.parametrize("name", list(CASES))
def test_matches_gather_of_dense_grad(name):
    cfg, strategy = CASES[name]
    seed = list(CASES).index(name)
    config, graphdef, params = random_model(cfg, seed)
    mask = empty_one_kernel(masks.random_mask(params, 0.6, seed=seed, strategy=strategy))
    mask = jax.tree.map(jnp.asarray, mask)
    rng = np.random.default_rng(seed + 10)
    batch = left_padded(rng, config.vocab_size)
    loss = loss_fn(graphdef, batch, jnp.asarray(rng.normal(size=batch[2].shape), jnp.float32))

    @jax.jit
    def both(p, m):
        (want_l, _), g = jax.value_and_grad(loss, has_aux=True)(p)
        (got_l, aux), got = sparse_grads.value_and_grad(loss, p, m, has_aux=True,
                                                        backend="xla")
        return want_l, got_l, jax.tree.map(gather, g, m), got, aux

    want_l, got_l, want, got, aux = both(params, mask)
    assert abs(float(got_l) - float(want_l)) <= REL * abs(float(want_l))
    assert int(aux["n"]) == int(batch[3].sum())
    flat_w = jax.tree_util.tree_flatten_with_path(want)[0]
    checked = 0
    for (path, w), g, i in zip(flat_w, jax.tree.leaves(got), jax.tree.leaves(mask)):
        assert g.shape == i.shape and g.dtype == jnp.float32, masks.path_str(path)
        if i.size:
            assert np.abs(np.asarray(w)).max() > 0, masks.path_str(path)
            assert max_rel(g, w) <= REL, (masks.path_str(path), max_rel(g, w))
            checked += 1
    assert checked == len(jax.tree.leaves(params)) - 1  # all but the emptied kernel
    assert any(i.ndim == (2 if strategy == "row_balanced" else 1)
               for i in jax.tree.leaves(mask) if i.size)


def test_bfloat16_params_float32_gradients():
    config, graphdef, params = random_model(CASES["qwen2_tied_bias_flat"][0], 7, "bfloat16")
    mask = jax.tree.map(jnp.asarray, masks.random_mask(params, 0.5, seed=7))
    rng = np.random.default_rng(7)
    batch = left_padded(rng, config.vocab_size)
    loss = loss_fn(graphdef, batch, jnp.asarray(rng.normal(size=batch[2].shape), jnp.float32))
    f32_params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    want = jax.tree.map(gather, jax.jit(jax.grad(lambda p: loss(p)[0]))(f32_params), mask)
    _, got = jax.jit(lambda p, m: sparse_grads.value_and_grad(loss, p, m, has_aux=True))(
        params, mask)
    for g, w, i in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(mask)):
        assert g.dtype == jnp.float32 and g.shape == i.shape
        # bf16 activations: close to the float32 gradient, far from zero
        assert max_rel(g, w) < 0.1


# ----------------------------------------------------------------------------- HLO


def _kernel_shapes(params, mask) -> set[tuple[int, int]]:
    shapes = set()
    for p, i in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
        if p.ndim == 2 and i.size:
            shapes |= {tuple(p.shape), tuple(p.shape[::-1])}
    return shapes


def _dot_output_shapes(hlo: str) -> set[tuple[int, ...]]:
    out = set()
    for m in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} (?:dot|convolution)\(", hlo):
        out.add(tuple(int(d) for d in m.group(1).split(",") if d))
    return out


def test_compiled_backward_has_no_dense_weight_gradient_dot():
    cfg = dict(CASES["qwen2_tied_bias_flat"][0], vocab_size=131, hidden_size=24,
               intermediate_size=40, num_heads=3, num_kv_heads=1, head_dim=8)
    config, graphdef, params = random_model(cfg, 3)
    rng = np.random.default_rng(3)
    batch = left_padded(rng, config.vocab_size, batch=2, prompt=7, completion=4)
    loss = loss_fn(graphdef, batch, jnp.asarray(rng.normal(size=batch[2].shape), jnp.float32))
    mask = jax.tree.map(jnp.asarray, masks.random_mask(params, 0.9, seed=3))
    kernels = _kernel_shapes(params, mask)
    assert (24, 40) in kernels and (131, 24) in kernels  # MLP kernel, tied embedding

    trainable_cfg = dict(sparsity=0.9, backend="xla")
    results = {}
    for setting in ("on", "off"):
        trainable = build_trainable(TrainableConfig(sparse_grads=setting, **trainable_cfg),
                                    params, mask=mask)
        state = trainable.init(params)
        fn = jax.jit(lambda p, s, t=trainable: t.value_and_grad(loss, p, s))
        results[setting] = _dot_output_shapes(fn.lower(params, state).compile().as_text())
    assert not results["on"] & kernels, results["on"] & kernels
    # Negative control: today's path forms the dense weight gradients with dots.
    assert (24, 40) in results["off"] or (40, 24) in results["off"]
    assert (131, 24) in results["off"] or (24, 131) in results["off"]


# ----------------------------------------------------------------------------- pieces


def test_xla_sampled_product_chunks_and_ragged_sizes():
    rng = np.random.default_rng(0)
    for (i, o, t, k, e, tc) in [(7, 5, 13, 9, 4, 5), (30, 11, 64, 200, 256, 2048),
                                (3, 4, 1, 1, 2, 1), (5, 5, 9, 0, 4, 4)]:
        xt = rng.normal(size=(i, t)).astype(np.float32)
        dyt = rng.normal(size=(o, t)).astype(np.float32)
        a, b = rng.integers(0, i, k).astype(np.int32), rng.integers(0, o, k).astype(np.int32)
        got = xla_sampled_product(jnp.asarray(xt), jnp.asarray(dyt), jnp.asarray(a),
                                  jnp.asarray(b), entry_chunk=e, token_chunk=tc)
        want = (xt.astype(np.float64) @ dyt.T.astype(np.float64))[a, b]
        assert got.shape == (k,) and got.dtype == jnp.float32
        if k:
            assert max_rel(got, want) <= REL


def test_sparse_weight_misuse_is_one_line_error():
    w = sparse_grads.SparseWeight(jnp.ones((3, 4)), jnp.arange(2, dtype=jnp.int32),
                                  jnp.ones((2,)))
    with pytest.raises(TypeError, match="sparse_grads off"):
        jnp.sin(w)
    with pytest.raises(ValueError, match="does not fit"):
        ops.matmul(jnp.ones((2, 5)), w)
    with pytest.raises(ValueError, match="transposed"):
        ops.take_rows(w.T, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="sparse_grads must be"):
        TrainableConfig(sparse_grads="maybe")


def test_auto_setting_by_density(monkeypatch):
    from sparsejax.kernels import cpu_sampled_product
    assert sparse_grads.use_sparse_grads("on", 0.5) and not sparse_grads.use_sparse_grads(
        "off", 1e-4)
    for kernel, key in ((True, "cpu"), (False, "cpu_xla")):
        monkeypatch.setattr(cpu_sampled_product, "available", lambda k=kernel: k)
        limit = sparse_grads.AUTO_MAX_DENSITY[key]
        assert sparse_grads.use_sparse_grads("auto", limit / 2, "xla")
        assert not sparse_grads.use_sparse_grads("auto", min(1.0, limit * 2), "xla")
    # XLA's gather is slower than the kernel: its sparse backward stops at a lower density.
    assert sparse_grads.AUTO_MAX_DENSITY["cpu_xla"] < sparse_grads.AUTO_MAX_DENSITY["cpu"]


# ----------------------------------------------------------------------------- trainers


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER)


def _tiny_policy(vocab: int):
    config = DecoderConfig(model_type="qwen2", vocab_size=vocab, hidden_size=16,
                           intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                           head_dim=8, qkv_bias=True, tie_word_embeddings=True)
    return nnx.split(init_model(config, seed=0))


def _assert_same_step(trainers, records):
    """Moments, loss and gradient norm agree to 1e-5; so do the stepped params wherever
    the gradient is not tiny (at ``|g| ~ eps = 1e-8`` Adam's ``g / (|g| + eps)`` turns
    float32 rounding of the gradient into visible differences); nothing else moved."""
    on, off = trainers
    moved = 0.0
    for a, b in zip(jax.tree.leaves(on.opt_state.mu) + jax.tree.leaves(on.opt_state.nu),
                    jax.tree.leaves(off.opt_state.mu) + jax.tree.leaves(off.opt_state.nu)):
        if a.size:
            assert max_rel(a, b) <= REL
            moved = max(moved, float(np.abs(np.asarray(b)).max()))
    assert moved > 0, "no gradient reached the optimizer: the check would be vacuous"
    for pa, pb, idx, mu in zip(jax.tree.leaves(on.params), jax.tree.leaves(off.params),
                               jax.tree.leaves(off.opt_state.indices),
                               jax.tree.leaves(off.opt_state.mu)):
        pa, pb = np.asarray(pa).reshape(-1), np.asarray(pb).reshape(-1)
        idx = np.asarray(idx).reshape(-1)
        off_mask = np.ones(pa.size, bool)
        off_mask[idx] = False
        np.testing.assert_array_equal(pa[off_mask], pb[off_mask])
        sure = np.abs(np.asarray(mu).reshape(-1)) >= 1e-7  # |g| >= 1e-6
        np.testing.assert_allclose(pa[idx][sure], pb[idx][sure], rtol=REL, atol=1e-7)
    for key in ("loss", "grad_norm"):
        assert abs(records[0][key] - records[1][key]) <= REL * abs(records[1][key]), key


def test_grpo_step_with_sparse_grads_equals_dense_path(tokenizer, tmp_path):
    prompts = [tokenizer(q)["input_ids"] for q in ("1+1=", "two plus three")]
    reward = lambda completions, answers: [len(set(c)) / 8.0 for c in completions]
    trainers, records = [], []
    for setting in ("on", "off"):
        graphdef, params = _tiny_policy(len(tokenizer))
        config = GRPOConfig(steps=1, prompts_per_step=2, num_generations=4, max_new_tokens=6,
                            micro_batch_size=4, generation_batch_size=8, beta=0.05,
                            eval_batch_size=4)
        trainer = GRPOTrainer(graphdef, params, tokenizer, reward, config,
                              TrainableConfig(sparsity=0.9, learning_rate=1e-2, backend="xla",
                                           sparse_grads=setting), tmp_path / setting)
        assert trainer.trainable.sparse_grads == (setting == "on")
        records.append(trainer.train_step(prompts, ["2", "5"]))
        trainers.append(trainer)
    _assert_same_step(trainers, records)


def test_dpo_step_with_sparse_grads_equals_dense_path(tokenizer, tmp_path):
    pairs = [{"prompt": f"Is {i} + {i} = {2 * i}?", "chosen": "yes", "rejected": "no"}
             for i in range(4)]
    trainers, records = [], []
    for setting in ("on", "off"):
        graphdef, params = _tiny_policy(len(tokenizer))
        params = jax.tree.map(lambda x: x * 10.0, params)  # log-probs that vary
        config = DPOConfig(steps=1, batch_size=4, micro_batch_size=2, max_prompt_length=32,
                           max_completion_length=4, logprob_chunk_size=16)
        trainer = DPOTrainer(graphdef, params, tokenizer, config,
                             TrainableConfig(sparsity=0.9, learning_rate=5e-2, backend="xla",
                                          sparse_grads=setting), tmp_path / setting)
        enc = trainer.encode(pairs)
        ref = np.stack(trainer.reference_logprobs(enc), axis=1)
        records.append(trainer.train_step(enc, ref))
        trainers.append(trainer)
    _assert_same_step(trainers, records)
