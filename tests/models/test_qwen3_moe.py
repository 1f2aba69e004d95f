"""Qwen3-MoE against transformers' Qwen3MoeForCausalLM: logits of tiny random configs
(GQA, tied and untied, renormalised and raw top-k weights, dense layers among MoE ones
through mlp_only_layers and decoder_sparse_step) on left-padded batches, router logits
and the load-balancing loss, greedy generation (batch and slot samplers), the HF round
trip in the Hub's per-expert layout, the config reader and presets. Gradients, the
grouped matmuls and the sparse backward are in test_moe_gradients.py."""

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
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, load_balancing_loss_func

from sparsejax.models import (
    PRESETS,
    DecoderConfig,
    WeightLoadError,
    from_hf_config,
    load_hf,
    moe,
    preset,
    save_hf,
)
from sparsejax.models.decoder import apply_with_router_logits, reconfigure

ATOL = 1e-4

#: Tiny Qwen3-MoE configs: GQA 2:1 and 3:1, head_dim != hidden / heads, untied with
#: renormalised top-k and a dense layer by mlp_only_layers; tied with raw top-k
#: probabilities, attention biases and MoE every second layer (decoder_sparse_step 2).
VARIANTS = {
    "gqa2_untied_norm_mlp_only": dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=12,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
        rope_theta=1e6, tie_word_embeddings=False),
    "gqa3_tied_raw_step2": dict(
        vocab_size=83, hidden_size=24, intermediate_size=40, moe_intermediate_size=10,
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
        num_experts=5, num_experts_per_tok=3, norm_topk_prob=False, decoder_sparse_step=2,
        rope_theta=1e4, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=True),
}


def build_hf(variant: str, folder: Path, seed: int = 0) -> Qwen3MoeForCausalLM:
    """A transformers Qwen3-MoE of ``variant`` with every parameter random (router, experts,
    norms and biases too), saved to ``folder``; eval mode. Its experts run transformers'
    eager loop (the float32 reference; torch's grouped matmul wants 16-byte strides)."""
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         experts_implementation="eager", **VARIANTS[variant])
    hf = Qwen3MoeForCausalLM(cfg).eval()
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


def hf_forward(hf, tokens, mask):
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos), output_router_logits=True)


# ----------------------------------------------------------------------------- forward


def test_config_read_from_the_checkpoint(tiny):
    name, hf, _, model = tiny
    c, v = model.config, VARIANTS[name]
    assert c.model_type == "qwen3_moe" and c.qk_norm
    assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (
        v["num_experts"], v["num_experts_per_tok"], v["moe_intermediate_size"])
    assert c.norm_topk_prob == v["norm_topk_prob"]
    assert c.tie_word_embeddings == v["tie_word_embeddings"]
    assert c.head_dim == v["head_dim"] != c.hidden_size // c.num_heads
    hf_moe = tuple(i for i, layer in enumerate(hf.model.layers)
                   if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock))
    assert c.moe_layers == hf_moe and 0 < len(hf_moe) < c.num_layers
    _, params = nnx.split(model)
    assert sum(x.size for x in jax.tree.leaves(params)) == c.num_params() == sum(
        p.numel() for p in hf.parameters())
    i = hf_moe[0]
    block = params["layers"][i]["mlp"]
    e, h, m = c.num_experts, c.hidden_size, c.moe_intermediate_size
    assert block["gate"]["kernel"][...].shape == (h, e)
    assert block["experts"]["gate_proj"][...].shape == block["experts"]["up_proj"][...].shape == (
        e, h, m)
    assert block["experts"]["down_proj"][...].shape == (e, m, h)
    # Expert e's kernels are the (transposed) rows of transformers' fused tensors.
    fused = hf.model.layers[i].mlp.experts
    np.testing.assert_array_equal(np.asarray(block["experts"]["up_proj"][...][3]),
                                  fused.gate_up_proj[3, m:].detach().numpy().T)
    np.testing.assert_array_equal(np.asarray(block["experts"]["down_proj"][...][1]),
                                  fused.down_proj[1].detach().numpy().T)


def test_logits_match_transformers_left_padded(tiny):
    name, hf, _, model = tiny
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(sorted(VARIANTS).index(name) + 100)
    tokens, mask = left_padded_batch(rng, model.config.vocab_size)
    ref = hf_forward(hf, tokens, mask).logits.numpy()
    out = forward(graphdef, params, tokens, mask)
    real = mask.astype(bool)
    assert np.isfinite(out).all()
    assert np.abs(ref[real]).max() > 1.0  # not a comparison of near-zeros
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)
    # Negative control: the other top-k weighting gives other logits.
    flipped = reconfigure(graphdef, params, norm_topk_prob=not model.config.norm_topk_prob)
    other = forward(flipped, params, tokens, mask)
    assert np.abs(other[real] - ref[real]).max() > 100 * ATOL


def test_router_logits_and_load_balancing_loss_match_transformers(tiny):
    name, hf, _, model = tiny
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(sorted(VARIANTS).index(name) + 200)
    tokens, mask = left_padded_batch(rng, model.config.vocab_size, length=16)
    ref = hf_forward(hf, tokens, mask)
    logits, routers = jax.jit(apply_with_router_logits, static_argnums=0)(
        graphdef, params, jnp.asarray(tokens), jnp.asarray(mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], ref.logits.numpy()[real], atol=ATOL,
                               rtol=0)
    assert len(routers) == len(ref.router_logits) == len(model.config.moe_layers)
    flat = real.reshape(-1)
    for ours, theirs in zip(routers, ref.router_logits):
        assert ours.shape == tuple(theirs.shape)
        np.testing.assert_allclose(np.asarray(ours)[flat], theirs.numpy()[flat], atol=ATOL,
                                   rtol=0)
    k = model.config.num_experts_per_tok
    aux = moe.load_balancing_loss(routers, k, jnp.asarray(mask))
    np.testing.assert_allclose(float(aux), float(ref.aux_loss), rtol=1e-5)
    # Without a mask every row counts, pads included (transformers' mask=None branch).
    unmasked = load_balancing_loss_func(tuple(torch.tensor(np.asarray(r)) for r in routers),
                                        model.config.num_experts, k, None)
    np.testing.assert_allclose(float(moe.load_balancing_loss(routers, k)), float(unmasked),
                               rtol=1e-5)
    assert abs(float(unmasked) - float(aux)) > 1e-4  # the mask matters here
    # The loss transformers adds to the LM loss.
    labels = torch.tensor(np.where(real, tokens, -100))
    pos = torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=pos, labels=labels, output_router_logits=True)
        lm = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                position_ids=pos, labels=labels).loss
    np.testing.assert_allclose(float(out.loss) - float(lm),
                               model.config.router_aux_loss_coef * float(aux), rtol=1e-4)


def test_kv_cache_decode_logits_equal_full_forward(tiny):
    check_kv_cache_decode(tiny[3])


# ----------------------------------------------------------------------------- generation


def test_greedy_equals_transformers_generate_and_slot_sampler(tiny):
    _, hf, _, model = tiny
    check_greedy_matches_transformers(hf, model)


# ----------------------------------------------------------------------------- HF I/O


def test_save_then_transformers_load_is_exact(tiny, tmp_path):
    name, hf, folder, model = tiny
    save_hf(model, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["Qwen3MoeForCausalLM"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is Qwen3MoeForCausalLM
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "tie_word_embeddings", "attention_bias", "max_position_embeddings",
                  "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
                  "use_sliding_window", "sliding_window", "num_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef"):
        assert getattr(reloaded.config, field) == getattr(hf.config, field), field
    theirs, ours = hf.state_dict(), reloaded.state_dict()
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(ours[k].numpy(), theirs[k].numpy(), err_msg=k)
    # The Hub's per-expert layout, tensor for tensor what transformers writes.
    tensors, original = load_file(tmp_path / "model.safetensors"), load_file(
        folder / "model.safetensors")
    assert sorted(tensors) == sorted(original)
    first = model.config.moe_layers[0]
    assert f"model.layers.{first}.mlp.experts.0.gate_proj.weight" in tensors
    assert ("lm_head.weight" in tensors) == (not model.config.tie_word_embeddings)
    for k in original:
        np.testing.assert_array_equal(tensors[k], original[k], err_msg=k)
    again = load_hf(tmp_path)
    assert again.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_and_extra_experts_are_named(tiny, tmp_path):
    _, _, folder, model = tiny
    layer = model.config.moe_layers[0]
    tensors = load_file(folder / "model.safetensors")
    e = model.config.num_experts
    gone = f"model.layers.{layer}.mlp.experts.{e - 1}.up_proj.weight"
    extra = f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight"
    tensors[extra] = tensors.pop(gone)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightLoadError) as err:
        load_hf(tmp_path)
    assert f"missing tensor {gone!r}" in str(err.value)
    assert f"unexpected tensor {extra!r}" in str(err.value)
    tensors[gone] = tensors.pop(extra)[:, :-1]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadError, match=rf"tensor {gone!r} has shape"):
        load_hf(tmp_path)


def test_hf_config_reading_round_trip_and_refusals():
    cfg = PRESETS["Qwen3-30B-A3B"]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
            cfg.vocab_size, cfg.intermediate_size) == (
        2048, 48, 32, 4, 128, 128, 8, 768, 151936, 6144)
    assert cfg.norm_topk_prob and not cfg.tie_word_embeddings
    assert cfg.moe_layers == tuple(range(48))
    hf_cfg = cfg.to_hf_config()
    assert from_hf_config(hf_cfg, param_dtype="bfloat16") == cfg
    # transformers 5 writes the expert count as num_local_experts.
    saved = Qwen3MoeConfig(**hf_cfg).to_dict()
    assert "num_experts" not in saved and saved["num_local_experts"] == 128
    assert from_hf_config(saved, param_dtype="bfloat16") == cfg
    # Dense layers by step and by list; dense Qwen3 configs are unchanged by the MoE fields.
    small = DecoderConfig(model_type="qwen3_moe", num_layers=6, num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=8,
                          decoder_sparse_step=2, mlp_only_layers=[5, 1])
    assert small.mlp_only_layers == (1, 5) and small.moe_layers == (3,)
    assert from_hf_config(small.to_hf_config()) == small
    dense = DecoderConfig(model_type="qwen3")
    assert dense == DecoderConfig(model_type="qwen3") and dense.moe_layers == ()
    assert hash(dense) == hash(DecoderConfig(model_type="qwen3"))
    assert "num_experts" not in dense.to_hf_config()
    assert dense != dense.replace(model_type="qwen3_moe")
    for bad, match in [
            (dict(model_type="qwen3", num_experts=4), "only model_type 'qwen3_moe'"),
            (dict(num_experts_per_tok=5), "num_experts_per_tok"),
            (dict(moe_intermediate_size=0), "moe_intermediate_size"),
            (dict(decoder_sparse_step=0), "decoder_sparse_step"),
            (dict(mlp_only_layers=(6,)), r"mlp_only_layers \[6\]"),
            (dict(mlp_only_layers="1"), "mlp_only_layers must be"),
            (dict(num_experts=-1), "num_experts must be")]:
        with pytest.raises(ValueError, match=match) as err:
            small.replace(**bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        from_hf_config({**small.to_hf_config(), "num_experts_per_tok": "2"})
    with pytest.raises(NotImplementedError, match="sliding-window"):
        from_hf_config({**small.to_hf_config(), "use_sliding_window": True})


@pytest.mark.parametrize("name,total,active", [
    ("Qwen3-30B-A3B", 30_532_122_624, 3_353_032_704),
    ("Qwen3-235B-A22B", 235_093_634_560, 22_190_763_520)])
def test_presets_match_transformers_parameter_counts(name, total, active):
    cfg = preset(name)
    assert cfg.num_params() == total and cfg.num_active_params() == active
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg.to_hf_config()))
    assert sum(p.numel() for p in hf.parameters()) == total
