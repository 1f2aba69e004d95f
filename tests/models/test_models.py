"""The Flax decoder against transformers: tiny random configs of each family and the
real pretrained stories260K Llama, on left-padded batches (f32, 1e-4 absolute)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sparsejax.models import PRESETS, DecoderConfig, apply, from_hf_config, load_hf, preset

from paths import SHARED

STORIES = SHARED / "models" / "stories260K"
ATOL = 1e-4

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

#: Tiny configs covering every feature: GQA ratios 3 and 5, odd head counts, tied and
#: untied embeddings, llama3 rope scaling (active at these lengths), q/k/v biases,
#: Llama attention/MLP biases, head_dim != hidden / heads.
VARIANTS = {
    "llama_gqa3_untied_llama3rope": (LlamaConfig, dict(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8,
        tie_word_embeddings=False, rope_theta=500.0, rope_scaling=LLAMA3_SCALING)),
    "llama_mha5_tied_biases": (LlamaConfig, dict(
        vocab_size=89, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=5, head_dim=12,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "qwen2_gqa3_tied": (Qwen2Config, dict(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, rope_theta=1e6,
        tie_word_embeddings=True)),
    "qwen2_gqa5_untied": (Qwen2Config, dict(
        vocab_size=83, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=5, num_key_value_heads=1, head_dim=16, rope_theta=1e6,
        tie_word_embeddings=False)),
}


def build_tiny_hf(variant: str, folder: Path, seed: int = 0):
    """A transformers model of ``variant`` with random weights (biases and norms too),
    saved to ``folder``; returns the torch model in eval mode."""
    cls, kwargs = VARIANTS[variant]
    torch.manual_seed(seed)
    model_cls = LlamaForCausalLM if cls is LlamaConfig else Qwen2ForCausalLM
    hf = model_cls(cls(bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    hf.save_pretrained(folder)
    return hf


def left_padded_batch(rng: np.random.Generator, vocab: int, batch: int = 3, length: int = 24):
    """Random tokens with random left padding (row 0 unpadded)."""
    tokens = rng.integers(3, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):
        mask[b, :rng.integers(1, length // 2)] = 0
    tokens = np.where(mask == 1, tokens, 0)
    return tokens, mask


_jit_apply = jax.jit(apply, static_argnums=0)


def forward(model, tokens, mask=None) -> np.ndarray:
    """Our float32 logits, through the jitted pure :func:`apply`."""
    graphdef, params = nnx.split(model)
    return np.asarray(_jit_apply(graphdef, params, jnp.asarray(tokens),
                                 None if mask is None else jnp.asarray(mask)))


def hf_logits(hf, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers logits of a left-padded batch, positions from the mask (as generate)."""
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_tiny_hf(request.param, folder)
    return request.param, hf, folder


def test_tiny_logits_match_transformers_left_padded(tiny):
    name, hf, folder = tiny
    model = load_hf(folder)
    rng = np.random.default_rng(hash(name) % 2**32)
    tokens, mask = left_padded_batch(rng, model.config.vocab_size)
    ref = hf_logits(hf, tokens, mask)
    out = forward(model, tokens, mask)
    real = mask.astype(bool)
    assert np.isfinite(out).all()
    assert np.abs(ref[real]).max() > 1.0  # the comparison is not between near-zeros
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)


def test_padding_does_not_change_real_positions(tiny):
    _, _, folder = tiny
    model = load_hf(folder)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, model.config.vocab_size, (1, 10))
    unpadded = forward(model, tokens)
    padded_tokens = np.concatenate([np.zeros((1, 5), np.int64), tokens], axis=1)
    mask = np.concatenate([np.zeros((1, 5)), np.ones((1, 10))], axis=1).astype(np.int32)
    padded = forward(model, padded_tokens, mask)
    np.testing.assert_allclose(padded[:, 5:], unpadded, atol=1e-5, rtol=0)


def test_stories260k_matches_transformers():
    hf = LlamaForCausalLM.from_pretrained(STORIES).eval()
    model = load_hf(STORIES)
    assert model.config.tie_word_embeddings and model.config.num_kv_heads == 4
    rng = np.random.default_rng(0)
    tokens, mask = left_padded_batch(rng, model.config.vocab_size, batch=4, length=40)
    ref = hf_logits(hf, tokens, mask)
    out = forward(model, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)


def test_stories260k_greedy_matches_transformers_generate():
    from sparsejax.generation import sampler as sampling
    tok = AutoTokenizer.from_pretrained(STORIES)
    hf = LlamaForCausalLM.from_pretrained(STORIES).eval()
    enc = tok("Once upon a time", return_tensors="pt")
    n = 24
    with torch.no_grad():
        ref = hf.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          pad_token_id=0)[0, enc["input_ids"].shape[1]:].tolist()
    model = load_hf(STORIES)
    graphdef, params = nnx.split(model)
    tokens, mask = sampling.encode_prompts(tok, ["Once upon a time"])
    out = sampling.generate(graphdef, params, tokens, mask, jax.random.key(0),
                            sampling.SamplingParams(max_new_tokens=n, temperature=0.0))
    assert np.asarray(out.tokens[0]).tolist() == ref
    text = tok.decode(ref)
    assert text.startswith(", there was a little girl named Lily")


def test_apply_is_pure_and_differentiable_without_nans():
    """Gradients w.r.t. the params pytree are finite even with fully padded query rows."""
    model = load_hf(STORIES)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(2)
    tokens, mask = left_padded_batch(rng, 512, batch=2, length=12)

    def loss(p):
        logits = apply(graphdef, p, jnp.asarray(tokens), jnp.asarray(mask))
        return jnp.sum(jnp.where(jnp.asarray(mask)[..., None] == 1,
                                 jax.nn.log_softmax(logits), 0.0)) / 1e3

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(params))
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert float(jnp.abs(grads["embed"][...]).max()) > 0


def test_bfloat16_params_close_to_float32():
    f32 = load_hf(STORIES)
    bf16 = load_hf(STORIES, param_dtype="bfloat16")
    assert bf16.embed[...].dtype == jnp.bfloat16
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(3, 512, (2, 16)))
    a, b = forward(f32, tokens), forward(bf16, tokens)
    assert b.dtype == np.float32  # logits are float32 whatever the params
    assert np.abs(a - b).max() < 0.25 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.8


def test_hf_config_round_trip_both_layouts():
    old_layout = {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
    }
    cfg = from_hf_config(old_layout, param_dtype="bfloat16")
    assert cfg == PRESETS["Llama-3.2-1B"]
    assert from_hf_config(cfg.to_hf_config(), param_dtype="bfloat16") == cfg
    new_layout = LlamaConfig(**{k: v for k, v in old_layout.items() if k != "model_type"})
    assert from_hf_config(new_layout.to_dict(), param_dtype="bfloat16") == cfg
    with pytest.raises(NotImplementedError, match="rope scaling type"):
        from_hf_config({**old_layout, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(NotImplementedError, match="model_type"):
        from_hf_config({**old_layout, "model_type": "gemma"})


def test_smollm2_preset_is_the_public_config():
    """SmolLM2-135M(-Instruct)'s config.json fields, as transformers reads them."""
    public = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert from_hf_config(public.to_dict(), param_dtype="bfloat16") == PRESETS["SmolLM2-135M"]


def test_inv_frequencies_match_transformers():
    hf_cfg = LlamaConfig(**VARIANTS["llama_gqa3_untied_llama3rope"][1])
    hf = LlamaForCausalLM(hf_cfg)
    ours = from_hf_config(hf_cfg.to_dict()).inv_frequencies()
    np.testing.assert_allclose(ours, hf.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name,expected", [
    ("Qwen2.5-0.5B", 494_032_768), ("Qwen2.5-1.5B", 1_543_714_304),
    ("Qwen2.5-7B", 7_615_616_512), ("Llama-3.2-1B", 1_235_814_400),
    ("Llama-3.2-3B", 3_212_749_824), ("Llama-3.1-8B", 8_030_261_248)])
def test_presets_match_public_parameter_counts(name, expected):
    cfg = preset(name)
    assert cfg.num_params() == expected
    cls = {"llama": (LlamaConfig, LlamaForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[cfg.model_type]
    with torch.device("meta"):
        hf = cls[1](cls[0](**cfg.to_hf_config()))
    assert sum(p.numel() for p in hf.parameters()) == expected


def test_random_init_shapes_and_split():
    cfg = DecoderConfig(num_layers=2, tie_word_embeddings=False, qkv_bias=True)
    from sparsejax.models import init_model
    model = init_model(cfg, seed=1)
    _, params = nnx.split(model)
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
    assert params["layers"][0]["attn"]["q_proj"]["kernel"][...].shape == (64, 64)
    assert params["lm_head"][...].shape == (64, 512)
