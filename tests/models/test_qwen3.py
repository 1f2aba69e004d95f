"""Qwen3 (dense) against transformers' Qwen3ForCausalLM: logits of tiny random configs
(random q_norm / k_norm weights, GQA, tied and untied, head_dim != hidden / heads,
attention biases, llama3 rope scaling) on left-padded batches, greedy generation (batch
sampler and slot sampler), the HF round trip, the config reader and presets, the sparse
backward, LoRA targets and a tiny sparse GRPO run."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from decoder_checks import (
    check_greedy_matches_transformers,
    check_kv_cache_decode,
    forward,
    left_padded_batch,
)
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from sparsejax import lora, masks
from sparsejax import sparse_backward as sparse_grads
from sparsejax.models import PRESETS, DecoderConfig, from_hf_config, load_hf, preset, save_hf
from sparsejax.models.decoder import init_model
from sparsejax.models.logprobs import completion_logprobs
from sparsejax.optim.sparse import gather

from paths import SHARED

ATOL = 1e-4
TOKENIZER = SHARED / "tokenizers" / "qwen2.5"

#: Tiny Qwen3 configs: GQA 3:1 and 5:1, tied and untied, head_dim 12 / 16 (hidden /
#: heads is 8), llama3 rope scaling active at these lengths, attention biases (q, k, v, o).
VARIANTS = {
    "gqa3_tied_llama3rope": dict(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, rope_theta=1e6,
        tie_word_embeddings=True, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "gqa5_untied_bias": dict(
        vocab_size=83, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=5, num_key_value_heads=1, head_dim=16, rope_theta=1e4,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=True),
}


def build_hf(variant: str, folder: Path, seed: int = 0) -> Qwen3ForCausalLM:
    """A transformers Qwen3 of ``variant`` with every parameter random (the q/k norms,
    the layer norms and the biases too), saved to ``folder``; eval mode."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(bos_token_id=1, eos_token_id=2, pad_token_id=0, **VARIANTS[variant])
    hf = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name
                    else 0.2 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_hf(request.param, folder, seed=sorted(VARIANTS).index(request.param))
    return request.param, hf, folder, load_hf(folder)


def hf_logits(hf, tokens, mask) -> np.ndarray:
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos)).logits.float().numpy()



# ----------------------------------------------------------------------------- forward


def test_config_read_from_the_checkpoint(tiny):
    name, hf, _, model = tiny
    c, v = model.config, VARIANTS[name]
    assert c.model_type == "qwen3" and c.qk_norm
    assert (c.head_dim, c.num_heads, c.num_kv_heads) == (
        v["head_dim"], v["num_attention_heads"], v["num_key_value_heads"])
    assert c.head_dim != c.hidden_size // c.num_heads
    assert c.tie_word_embeddings == v["tie_word_embeddings"]
    assert c.qkv_bias == c.o_bias == v.get("attention_bias", False) and not c.mlp_bias
    assert c.rms_norm_eps == v.get("rms_norm_eps", 1e-6)
    assert (c.rope_scaling is not None) == ("rope_scaling" in v)
    np.testing.assert_allclose(c.inv_frequencies(), hf.model.rotary_emb.inv_freq.numpy(),
                               rtol=1e-6)
    _, params = nnx.split(model)
    assert sum(x.size for x in jax.tree.leaves(params)) == c.num_params() == sum(
        p.numel() for p in hf.parameters())
    attn = params["layers"][0]["attn"]
    assert attn["q_norm"]["weight"][...].shape == attn["k_norm"]["weight"][...].shape == (
        c.head_dim,)
    # The checkpoint's q/k norm weights are random, not the default ones.
    np.testing.assert_array_equal(np.asarray(attn["q_norm"]["weight"][...]),
                                  hf.model.layers[0].self_attn.q_norm.weight.detach().numpy())
    assert np.abs(np.asarray(attn["k_norm"]["weight"][...]) - 1).max() > 0.1


def test_logits_match_transformers_left_padded(tiny):
    name, hf, _, model = tiny
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(sorted(VARIANTS).index(name) + 100)
    tokens, mask = left_padded_batch(rng, model.config.vocab_size)
    ref = hf_logits(hf, tokens, mask)
    out = forward(graphdef, params, tokens, mask)
    real = mask.astype(bool)
    assert np.isfinite(out).all()
    assert np.abs(ref[real]).max() > 1.0  # not a comparison of near-zeros
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)
    # Negative control: without the trained q/k norm weights the logits are off.
    def ones(path, x):
        return jnp.ones_like(x) if "q_norm" in jax.tree_util.keystr(path) else x
    plain = forward(graphdef, jax.tree_util.tree_map_with_path(ones, params), tokens, mask)
    assert np.abs(plain[real] - ref[real]).max() > 100 * ATOL


def test_kv_cache_decode_logits_equal_full_forward(tiny):
    check_kv_cache_decode(tiny[3])


# ----------------------------------------------------------------------------- generation


def test_greedy_equals_transformers_generate_and_slot_sampler(tiny):
    _, hf, _, model = tiny
    check_greedy_matches_transformers(hf, model)


# ----------------------------------------------------------------------------- HF I/O


def test_save_then_transformers_load_is_exact(tiny, tmp_path):
    name, hf, _, model = tiny
    save_hf(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["Qwen3ForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is Qwen3ForCausalLM
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "tie_word_embeddings", "attention_bias", "max_position_embeddings",
                  "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
                  "use_sliding_window", "sliding_window", "layer_types"):
        assert getattr(reloaded.config, field) == getattr(hf.config, field), field
    theirs, ours = hf.state_dict(), reloaded.state_dict()
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(ours[k].numpy(), theirs[k].numpy(), err_msg=k)
    tensors = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in tensors) == (not model.config.tie_word_embeddings)
    assert "model.layers.0.self_attn.q_norm.weight" in tensors
    again = load_hf(tmp_path)
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_q_norm_is_named(tiny, tmp_path):
    _, _, folder, _ = tiny
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    from safetensors.numpy import save_file
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    from sparsejax.models import WeightLoadError
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_hf(tmp_path)


def test_hf_config_reading_and_refusals():
    hf_cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                         num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                         head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                         eos_token_id=151645)
    cfg = from_hf_config(hf_cfg.to_dict(), param_dtype="bfloat16")
    assert cfg == PRESETS["Qwen3-0.6B"]
    assert from_hf_config(cfg.to_hf_config(), param_dtype="bfloat16") == cfg
    # The Hub's old layout (rope_theta at the top level, no head_dim: Qwen3's default 128).
    old = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "rope_theta": 1e6, "rope_scaling": None,
           "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28}
    small = from_hf_config(old)
    assert small.head_dim == Qwen3Config(**{k: v for k, v in old.items()
                                            if k != "model_type"}).head_dim == 128
    assert small.qk_norm and not small.qkv_bias and not small.tie_word_embeddings
    with pytest.raises(NotImplementedError, match="sliding-window"):
        from_hf_config({**old, "use_sliding_window": True, "sliding_window": 16})
    with pytest.raises(NotImplementedError, match="sliding-window"):
        from_hf_config({**old, "layer_types": ["sliding_attention"]})
    # Llama / Qwen2 configs get no q/k norms, and cannot be written with them.
    assert not DecoderConfig(model_type="qwen2", qkv_bias=True).qk_norm
    assert DecoderConfig(model_type="qwen3").qk_norm
    with pytest.raises(ValueError, match="qk_norm"):
        DecoderConfig(model_type="llama", qk_norm=True).to_hf_config()


def test_llama_and_qwen2_params_have_no_qk_norms():
    for kind in ("llama", "qwen2"):
        cfg = DecoderConfig(model_type=kind, qkv_bias=kind == "qwen2", num_layers=1)
        _, params = nnx.split(nnx.eval_shape(lambda cfg=cfg: init_model(cfg)))
        assert set(params["layers"][0]["attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}


@pytest.mark.parametrize("name,expected", [
    ("Qwen3-0.6B", 596_049_920), ("Qwen3-1.7B", 1_720_574_976),
    ("Qwen3-4B", 4_022_468_096), ("Qwen3-8B", 8_190_735_360)])
def test_presets_match_transformers_parameter_counts(name, expected):
    cfg = preset(name)
    assert cfg.qk_norm and cfg.head_dim == 128 and cfg.max_position_embeddings == 40960
    assert cfg.num_params() == expected
    with torch.device("meta"):
        hf = Qwen3ForCausalLM(Qwen3Config(**cfg.to_hf_config()))
    assert sum(p.numel() for p in hf.parameters()) == expected


# ----------------------------------------------------------------------------- gradients


def _random_params(config: DecoderConfig, seed: int):
    graphdef, params = nnx.split(init_model(config, seed))
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    leaves = [jnp.asarray(np.asarray(x, np.float32) + 0.3 * rng.normal(size=x.shape), x.dtype)
              for x in leaves]
    return graphdef, jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("strategy", ["per_tensor", "row_balanced"])
def test_sparse_backward_matches_gather_of_dense_grad(strategy):
    tied = strategy == "per_tensor"
    config = DecoderConfig(model_type="qwen3", vocab_size=89, hidden_size=40,
                           intermediate_size=56, num_layers=1, num_heads=5, num_kv_heads=1,
                           head_dim=12, rms_norm_eps=1e-6, rope_theta=1e6,
                           tie_word_embeddings=tied, qkv_bias=not tied, o_bias=not tied)
    seed = 11 + int(tied)
    graphdef, params = _random_params(config, seed)
    mask = jax.tree.map(jnp.asarray, masks.random_mask(params, 0.6, seed=seed,
                                                       strategy=strategy))
    rng = np.random.default_rng(seed)
    pt = rng.integers(3, config.vocab_size, (3, 6))
    pm = (np.arange(6)[None] >= np.array([[0], [2], [4]])).astype(np.int32)
    ct = rng.integers(3, config.vocab_size, (3, 5))
    cm = (np.arange(5)[None] < np.array([[5], [3], [1]])).astype(np.int32)
    batch = [jnp.asarray(a) for a in (pt, pm, ct, cm)]
    weights = jnp.asarray(rng.normal(size=ct.shape), jnp.float32)

    def loss(p):
        logps, ent = completion_logprobs(graphdef, p, *batch, chunk_size=4,
                                         return_entropy=True)
        return jnp.sum(logps * weights) + 0.1 * jnp.sum(ent)

    @jax.jit
    def both(p, m):
        want_l, g = jax.value_and_grad(loss)(p)
        got_l, got = sparse_grads.value_and_grad(loss, p, m, backend="xla")
        return want_l, got_l, jax.tree.map(gather, g, m), got

    want_l, got_l, want, got = both(params, mask)
    assert abs(float(got_l) - float(want_l)) <= 1e-5 * abs(float(want_l))
    flat = jax.tree_util.tree_flatten_with_path(want)[0]
    names = set()
    for (path, w), g in zip(flat, jax.tree.leaves(got)):
        w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
        assert g.shape == w.shape and np.abs(w).max() > 0, masks.path_str(path)
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max(), masks.path_str(path)
        names.add(masks.path_str(path))
    assert any("q_norm" in n for n in names) and any("k_norm" in n for n in names)


# ----------------------------------------------------------------------------- LoRA


def test_lora_default_targets_find_the_projections(tiny, tmp_path):
    name, hf, _, model = tiny
    graphdef, params = nnx.split(model)
    cfg = lora.LoraConfig(rank=2, alpha=4.0)
    adapters = lora.init_adapters(params, cfg, seed=1)
    layers = model.config.num_layers
    assert len(adapters) == 7 * layers
    assert not any("norm" in p for p in adapters)
    rng = np.random.default_rng(7)
    tokens, mask = left_padded_batch(rng, model.config.vocab_size, length=14)
    real = mask.astype(bool)
    base = forward(graphdef, params, tokens, mask)
    np.testing.assert_array_equal(forward(graphdef, lora.attach(params, adapters, cfg.scale),
                                          tokens, mask), base)  # B = 0: no change
    # With B random, the adapters act on the right matrices: PEFT on transformers agrees.
    adapters = {p: lora.Factors(f.a, jnp.asarray(rng.normal(0, 0.3, f.b.shape), jnp.float32))
                for p, f in adapters.items()}
    folder = lora.save_peft(tmp_path / "adapter", adapters, cfg, params=params,
                            base_model_name_or_path=name)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(hf, folder).eval()
    try:
        ref = hf_logits(pm, tokens, mask)
    finally:
        pm.unload()
    out = forward(graphdef, lora.attach(params, adapters, cfg.scale), tokens, mask)
    assert np.abs(out[real] - base[real]).max() > 0.1
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- training


def test_tiny_sparse_grpo_run(tmp_path):
    from transformers import AutoTokenizer

    from sparsejax.trainers import GRPOConfig, GRPOTrainer, TrainableConfig
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = DecoderConfig(model_type="qwen3", vocab_size=len(tokenizer), hidden_size=16,
                           intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                           head_dim=8, tie_word_embeddings=True)
    graphdef, params = nnx.split(init_model(config, seed=0))
    base = jax.tree.map(np.asarray, params)
    prompts = [tokenizer(q)["input_ids"] for q in ("1+1=", "two plus three", "4*2?")]
    reward = lambda completions, answers: [len(set(c)) / 8.0 for c in completions]
    trainer = GRPOTrainer(graphdef, params, tokenizer, reward,
                          GRPOConfig(steps=2, prompts_per_step=2, num_generations=4,
                                     max_new_tokens=6, micro_batch_size=4,
                                     generation_batch_size=8, beta=0.05, save_every=0,
                                     eval_batch_size=4),
                          TrainableConfig(sparsity=0.9, learning_rate=1e-2), tmp_path)
    trainer.train(prompts, ["2", "5", "8"], progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text()
               .splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [0, 1]
    assert all(np.isfinite(r["loss"]) for r in train)
    moved = {masks.path_str(p): float(np.abs(np.asarray(a) - b).max()) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(trainer.params)[0], jax.tree.leaves(base))}
    assert max(moved.values()) > 1e-4, "training did not move the params"
    assert any("q_norm" in k for k in moved) and any("k_norm" in k for k in moved)
