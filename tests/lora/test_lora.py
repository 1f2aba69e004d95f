"""LoRA / masked LoRA / Partial-LoRA against PEFT and direct references.

PEFT's LoraModel on transformers' tiny Qwen2 and Llama is the reference for the
forward pass (f32, logits within 1e-4), for the adapter format in both directions,
and (through a merged HF checkpoint run by transformers) for merging.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from sparsejax.trainable.lora import LoraAdapter

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from sparsejax import lora  # noqa: E402
from sparsejax.config import TrainableConfig  # noqa: E402
from sparsejax.models import DecoderConfig, apply, load_hf  # noqa: E402
from sparsejax.models.decoder import Decoder, init_model  # noqa: E402

ATOL = 1e-4
_apply = jax.jit(apply, static_argnums=0)

#: (HF classes, config, PEFT LoRA settings): Qwen2 with q/k/v biases and plain scaling,
#: Llama with GQA, untied head and rsLoRA.
TINY = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(
        vocab_size=101, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, rope_theta=1e6,
        tie_word_embeddings=True), dict(r=4, lora_alpha=8, use_rslora=False)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(
        vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=1, head_dim=8,
        tie_word_embeddings=False), dict(r=3, lora_alpha=12, use_rslora=True)),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_base(name: str, folder) -> torch.nn.Module:
    cfg_cls, model_cls, kwargs, _ = TINY[name]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in n
                    else 0.2 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf


def _peft_model(hf, name: str):
    settings = TINY[name][3]
    cfg = peft.LoraConfig(target_modules=TARGETS, lora_dropout=0.0, **settings)
    return peft.get_peft_model(hf, cfg).eval()


def _batch(vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (3, 14))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0
    mask[2, :9] = 0
    return np.where(mask == 1, tokens, 0), mask


def _torch_logits(model, tokens, mask) -> np.ndarray:
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def _ours(graphdef, params, tokens, mask) -> np.ndarray:
    return np.asarray(_apply(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask)))


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf = _hf_base(name, root / "base")
    pm = _peft_model(hf, name)
    torch.manual_seed(1)
    with torch.no_grad():  # PEFT's B starts at zero: make the adapter do something
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.3)
    pm.save_pretrained(root / "peft")
    model = load_hf(root / "base")
    graphdef, params = nnx.split(model)
    return dict(name=name, root=root, pm=pm, graphdef=graphdef, params=params,
                vocab=model.config.vocab_size)


def test_peft_adapter_loads_here_with_peft_logits(tiny):
    adapters, cfg = lora.load_peft(tiny["root"] / "peft", tiny["params"])
    settings = TINY[tiny["name"]][3]
    assert (cfg.rank, cfg.alpha, cfg.rslora) == (settings["r"], settings["lora_alpha"],
                                                 settings["use_rslora"])
    assert len(adapters) == 7 * 2
    tokens, mask = _batch(tiny["vocab"], 0)
    ref = _torch_logits(tiny["pm"], tokens, mask)
    out = _ours(tiny["graphdef"], lora.attach(tiny["params"], adapters, cfg.scale), tokens, mask)
    base = _ours(tiny["graphdef"], tiny["params"], tokens, mask)
    real = mask.astype(bool)
    assert np.abs(ref[real] - base[real]).max() > 0.1  # the adapter changes the logits
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)
    print(f"{tiny['name']}: LoRA logits vs PEFT max |diff| "
          f"{np.abs(out[real] - ref[real]).max():.2e}")


def test_adapter_saved_here_loads_in_peft_and_merges(tiny):
    name, params = tiny["name"], tiny["params"]
    settings = TINY[name][3]
    cfg = lora.LoraConfig(rank=settings["r"], alpha=settings["lora_alpha"],
                          rslora=settings["use_rslora"])
    adapters = lora.init_adapters(params, cfg, seed=3)
    rng = np.random.default_rng(4)
    adapters = {p: lora.Factors(f.a, jnp.asarray(rng.normal(0, 0.3, f.b.shape), jnp.float32))
                for p, f in adapters.items()}
    folder = lora.save_peft(tiny["root"] / "ours", adapters, cfg, params=params,
                            base_model_name_or_path=str(tiny["root"] / "base"))
    # Our tensor names are PEFT's own.
    ours = load_file(os.path.join(folder, "adapter_model.safetensors"))
    theirs = peft.get_peft_model_state_dict(tiny["pm"])
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].shape == tuple(theirs[k].shape) for k in ours)
    assert json.load(open(os.path.join(folder, "adapter_config.json")))["target_modules"] \
        == sorted(TARGETS)
    base = AutoModelForCausalLM.from_pretrained(tiny["root"] / "base").eval()
    loaded = peft.PeftModel.from_pretrained(base, folder).eval()
    tokens, mask = _batch(tiny["vocab"], 1)
    ref = _torch_logits(loaded, tokens, mask)
    out = _ours(tiny["graphdef"], lora.attach(params, adapters, cfg.scale), tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)
    # Merged (HF checkpoint run by transformers) == unmerged forward.
    lora.save_merged_hf(tiny["root"] / "merged", tiny["graphdef"], params, adapters, cfg)
    merged = AutoModelForCausalLM.from_pretrained(tiny["root"] / "merged").eval()
    np.testing.assert_allclose(_torch_logits(merged, tokens, mask)[real], out[real],
                               atol=ATOL, rtol=0)
    # A fresh PEFT-initialised adapter leaves the model exactly as it was (B = 0), and
    # A follows PEFT's kaiming-uniform bound 1/sqrt(in).
    fresh = lora.init_adapters(params, cfg)
    for f in fresh.values():
        assert not np.any(np.asarray(f.b))
        bound = 1 / np.sqrt(f.a.shape[0])
        a = np.asarray(f.a)
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound


def test_bad_adapters_and_configs_are_refused(tiny, tmp_path):
    params = tiny["params"]
    cfg = lora.LoraConfig(rank=2, alpha=4, targets=("q", "down"))
    adapters = lora.init_adapters(params, cfg)
    assert sorted({p.split("/")[-2] for p in adapters}) == ["down_proj", "q_proj"]
    with pytest.raises(ValueError, match="--lora-rank 1000 exceeds"):
        lora.init_adapters(params, lora.LoraConfig(rank=1000))
    with pytest.raises(ValueError, match="--lora-rank must be"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="--lora-alpha"):
        lora.LoraConfig(alpha=-1.0)
    with pytest.raises(ValueError, match="matches no kernel"):
        lora.init_adapters(params, lora.LoraConfig(targets=("qkv_proj",)))
    with pytest.raises(ValueError, match="--lora-density"):
        lora.factor_masks(adapters, 0.0)
    with pytest.raises(ValueError, match="--lora-density"):
        lora.factor_masks(adapters, 1.5)
    # An adapter made for another base model: a shape that does not fit ...
    other = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=40,
                          num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
    other_params = nnx.split(nnx.eval_shape(lambda: Decoder(other, rngs=nnx.Rngs(0))))[1]
    with pytest.raises(ValueError, match=r"has shape .* needs"):
        lora.load_peft(tiny["root"] / "peft", other_params)
    # ... and a module it does not have (the right shapes, one layer more).
    tensors = load_file(tiny["root"] / "peft" / "adapter_model.safetensors")
    tensors = {**tensors, **{k.replace("layers.1.", "layers.7."): v
                             for k, v in tensors.items() if "layers.1." in k}}
    (tmp_path / "deep").mkdir()
    save_file(tensors, tmp_path / "deep" / "adapter_model.safetensors")
    shutil.copy(tiny["root"] / "peft" / "adapter_config.json", tmp_path / "deep")
    with pytest.raises(ValueError, match=r"layers\.7.* does not have"):
        lora.load_peft(tmp_path / "deep", params)
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        lora.load_peft(tmp_path, params)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def small():
    config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=8, remat="none")
    graphdef, params = nnx.split(init_model(config, seed=1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)))
    return graphdef, params, tokens


def test_masked_lora_trains_only_its_entries_and_restores_exactly(small):
    graphdef, params, tokens = small
    cfg = lora.LoraConfig(rank=4, alpha=8)
    # A trained-looking start (B != 0), so that A has a gradient too.
    rng = np.random.default_rng(2)
    adapters = {p: lora.Factors(f.a, jnp.asarray(rng.normal(0, 0.5, f.b.shape), jnp.float32))
                for p, f in lora.init_adapters(params, cfg, seed=2).items()}
    mask = lora.factor_masks(adapters, 0.25, seed=5)
    up = LoraAdapter(TrainableConfig(sparsity=0.0, learning_rate=1e-2, max_grad_norm=None),
                          params, cfg, adapters=adapters, mask=mask)
    policy = up.policy_params(params)
    state = up.init(policy)
    k = up.num_trainable(policy)
    assert k == sum(int(np.floor(0.25 * np.size(x))) for x in jax.tree.leaves(adapters))
    assert sum(np.size(x) for x in jax.tree.leaves(state.mu)) == k  # O(k) state
    assert sum(np.size(x) for x in jax.tree.leaves(state.nu)) == k

    def loss_fn(p):
        logits = apply(graphdef, p, tokens)
        return -jax.nn.log_softmax(logits)[..., 3].mean(), {}

    vg = jax.jit(lambda p, s: up.value_and_grad(loss_fn, p, s))
    # The factor gradient against autodiff of the merged model (W + s A B formed densely).
    start = lora.apply_mask(adapters, mask)
    ref = jax.jit(jax.grad(lambda ad: loss_fn(lora.merge(params, ad, cfg.scale))[0]))(start)
    _, g = vg(policy, state)
    for ours, theirs in zip(jax.tree.leaves(g), jax.tree.leaves(up.compress(ref, state))):
        assert np.abs(np.asarray(theirs)).max() > 0
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
    ref_values = up.active_values(policy, state)
    for _ in range(3):
        _, g = vg(policy, state)
        policy, state, report = up.apply(policy, g, state)
        assert not bool(report.skipped)
    trained = jax.tree.map(np.asarray, up.adapters(policy))
    for path, f in trained.items():
        for name in "ab":
            x = getattr(f, name).reshape(-1)
            idx = np.asarray(getattr(mask[path], name))
            off = np.ones(x.size, bool)
            off[idx] = False
            assert not np.any(x[off]), f"{path}/{name}: an entry off the mask changed"
            x0 = np.asarray(getattr(start[path], name)).reshape(-1)
            assert np.mean(x[idx] != x0[idx]) > 0.9
    # The base kernels are the same arrays (no gradient, no update).
    base_after, _ = lora.detach(policy)
    for a, b in zip(jax.tree.leaves(base_after), jax.tree.leaves(params)):
        assert a is b
    # Checkpoint = optimizer state + trained values; restore is bit for bit.
    tree = jax.tree.map(np.asarray, up.checkpoint_tree(policy, state))
    assert "params" not in tree
    restored, rstate = up.restore_policy(up.policy_params(params), tree)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(policy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The reference: the initial values swapped back (the policy the run started from).
    ref_policy, _ = up.swap_active(restored, rstate.indices, ref_values)
    np.testing.assert_array_equal(np.asarray(_apply(graphdef, ref_policy, tokens)),
                                  np.asarray(_apply(graphdef, up.policy_params(params),
                                                    tokens)))
    # A fresh adapter (B = 0) is the model with the adapter off, exactly.
    fresh = LoraAdapter(TrainableConfig(sparsity=0.0), params, cfg)
    np.testing.assert_array_equal(
        np.asarray(_apply(graphdef, fresh.policy_params(params), tokens)),
        np.asarray(_apply(graphdef, params, tokens)))


# ----------------------------------------------------------------------------- ratios


def test_leverage_scores_match_a_direct_svd():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(30, 12)) @ np.diag(np.linspace(3, 0.1, 12)) @ rng.normal(size=(12, 20))
    k = 5
    rows, cols = lora.leverage_scores(w, k)
    u, s, vt = np.linalg.svd(w)
    wk = (u[:, :k] * s[:k]) @ vt[:k]
    # Leverage = the diagonals of the projectors onto W_k's column and row spaces.
    np.testing.assert_allclose(rows, np.diag(wk @ np.linalg.pinv(wk)), atol=1e-10)
    np.testing.assert_allclose(cols, np.diag(np.linalg.pinv(wk) @ wk), atol=1e-10)
    assert np.isclose(rows.sum(), k) and np.isclose(cols.sum(), k)
    imp = lora.entry_importance(w, "leverage", k)
    np.testing.assert_allclose(imp, np.outer(rows, cols))
    with pytest.raises(ValueError, match="svd rank"):
        lora.leverage_scores(w, 13 + 20)


def _kernel_tree(**kernels):
    return {"layers": {"0": {"attn": {name: {"kernel": jnp.asarray(w, jnp.float32)}
                                      for name, w in kernels.items()}}}}


def test_ratio_derivation_known_answer(tmp_path):
    rng = np.random.default_rng(1)
    # q: rank one on a 3 x 4 block (+ tiny noise): the 12 block entries carry all the
    # leverage, so progressive masking zeroes the other 88 first. The metric halves once
    # a block entry is gone, so it holds up to 80% sparsity and fails at 90%.
    q = 1e-4 * rng.normal(size=(10, 10))
    q[:3, :4] += np.outer([1.0, 2.0, 1.5], [1.0, -1.0, 2.0, 0.5])
    # v: the metric loses 0.25 per unit of sparsity: holds while 1 - s/4 >= 0.87.
    v = rng.normal(size=(10, 10))

    def metric(params):
        kq = np.asarray(params["layers"]["0"]["attn"]["q_proj"]["kernel"])
        kv = np.asarray(params["layers"]["0"]["attn"]["v_proj"]["kernel"])
        return min(1.0 if np.all(kq[:3, :4] != 0) else 0.5, 1.0 - 0.25 * np.mean(kv == 0))

    params = _kernel_tree(q_proj=q, v_proj=v)
    paths = ["layers/0/attn/q_proj/kernel", "layers/0/attn/v_proj/kernel"]
    found = lora.derive_ratios(params, metric, paths, importance="leverage", svd_rank=1,
                               threshold=0.87, step=0.1, max_sparsity=0.95, model="toy")
    assert found.ratios == {paths[0]: 0.8, paths[1]: 0.5}
    assert [s for s, _ in found.curves[paths[0]]][-1] == 0.9
    mag = lora.derive_ratios(params, metric, paths, importance="magnitude",
                             threshold=0.87, step=0.1)
    assert mag.ratios[paths[0]] == 0.8
    # JSON round trip, and a file for another model is refused.
    f = lora.save_ratios(tmp_path / "ratios.json", found)
    back = lora.load_ratios(f, params, model="toy")
    assert back.ratios == found.ratios and back.settings["svd_rank"] == 1
    with pytest.raises(ValueError, match=r"made for another model: kernel .*q_proj"):
        lora.load_ratios(f, _kernel_tree(q_proj=np.zeros((10, 8)), v_proj=v))
    with pytest.raises(ValueError, match="made for another model: it has kernel"):
        lora.load_ratios(f, _kernel_tree(q_proj=q, k_proj=v))
    with pytest.raises(ValueError, match="made for model 'toy'"):
        lora.load_ratios(f, params, model="other")
    # Partial-LoRA: random masks at density 1 - ratio; Targeted: the top rows/columns.
    adapters = {p: lora.Factors(jnp.ones((10, 2)), jnp.ones((2, 10))) for p in paths}
    pm = lora.partial_lora_masks(adapters, back, seed=0)
    assert [np.size(pm[p].a) for p in paths] == [4, 10]
    tm = lora.targeted_lora_masks(adapters, back, params, svd_rank=1)
    # Row leverages of q's block are 1 : 4 : 2.25 and column leverages 1 : 1 : 4 : 0.25,
    # so A keeps rows 1 and 2 (2 x 2 entries), B column 2 and column 0 or 1.
    rows_a = sorted(set(np.asarray(tm[paths[0]].a) // 2))
    cols_b = set(np.asarray(tm[paths[0]].b) % 10)
    assert rows_a == [1, 2] and 2 in cols_b and cols_b <= {0, 1, 2} and len(cols_b) == 2


# ----------------------------------------------------------------------------- flags


def test_script_adapter_flags(small, tmp_path):
    """The scripts' adapter flags: generated from AdapterConfig, checked (errors name the
    flags), built by build_trainable."""
    import argparse

    from sparsejax.cli.checks import check_ratios_file
    from sparsejax.cli.flags import add_flags, build
    from sparsejax.config import AdapterConfig
    from sparsejax.trainable import build_trainable
    from sparsejax.trainable.full import FullFinetuning
    _, params, _ = small
    parser = argparse.ArgumentParser()
    add_flags(parser, AdapterConfig)
    sparse = TrainableConfig(sparsity=0.0)

    def adapter(*argv):
        """The AdapterConfig of the flags, checked as the scripts check them."""
        config = build(AdapterConfig, parser.parse_args([str(a) for a in argv]))
        if config.kind not in ("none", "lora"):
            check_ratios_file(config.lora_ratios)
        return config

    assert isinstance(build_trainable(sparse, params, adapter=adapter()), FullFinetuning)
    up = build_trainable(sparse, params, adapter=adapter(
        "--adapter", "lora", "--lora-rank", "2", "--lora-targets", "q,v", "--lora-density", "0.5"))
    assert set(lora.densities(up.mask, up.initial_adapters).values()) == {0.5}
    shapes = lora.kernel_shapes(params)
    paths = [p for p in shapes if "/q_proj/" in p or "/v_proj/" in p]
    ratios = lora.Ratios(ratios={p: 0.75 for p in paths},
                         kernels={p: list(shapes[p]) for p in paths},
                         settings={"importance": "magnitude"})
    f = lora.save_ratios(tmp_path / "r.json", ratios)
    for kind in ("partial-lora", "targeted-lora"):
        up = build_trainable(sparse, params, adapter=adapter(
            "--adapter", kind, "--lora-rank", "2", "--lora-targets", "q,v", "--lora-ratios", f))
        assert set(lora.densities(up.mask, up.initial_adapters).values()) == {0.25}
    bad = {("--adapter", "lora", "--lora-rank", "0"): "--lora-rank",
           ("--adapter", "lora", "--lora-density", "0"): "--lora-density",
           ("--adapter", "lora", "--lora-alpha", "-2"): "--lora-alpha",
           ("--adapter", "partial-lora"): "needs --lora-ratios",
           ("--adapter", "targeted-lora", "--lora-ratios", str(tmp_path / "no.json")):
               "--lora-ratios .*unreadable"}
    for argv, needle in bad.items():
        with pytest.raises(ValueError, match=needle):
            adapter(*argv)
    # A ratios file for another model, and targets the ratios do not cover.
    with pytest.raises(ValueError, match="no ratio for adapted kernel"):
        build_trainable(sparse, params, adapter=adapter("--adapter", "partial-lora",
                                                        "--lora-ratios", f))
