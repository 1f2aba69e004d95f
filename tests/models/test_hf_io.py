"""HF weight I/O: save -> transformers load, sharded checkpoints, placement, and clear
errors for missing, unexpected and mis-shaped tensors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sparsejax.models import WEIGHT_RULES, WeightLoadError, apply, hf_io, load_hf, load_hf_params, save_hf

from paths import SHARED

STORIES = SHARED / "models" / "stories260K"

_jit_apply = jax.jit(apply, static_argnums=0)


def forward(model, tokens, mask) -> np.ndarray:
    graphdef, params = nnx.split(model)
    return np.asarray(_jit_apply(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask)))


def build_hf(kind: str, folder: Path, tied: bool, seed: int = 0):
    """A tiny random transformers model (GQA, random biases/norms) saved to ``folder``."""
    torch.manual_seed(seed)
    common = dict(vocab_size=67, hidden_size=36, intermediate_size=44, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, head_dim=12,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**common, attention_bias=True))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=1e6))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name
                    else 0.2 * torch.randn_like(p))
    hf.eval().save_pretrained(folder)
    return hf


def random_batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (2, 14))
    mask = np.ones_like(tokens)
    mask[1, :4] = 0
    return tokens, mask


def torch_logits(hf, tokens, mask) -> np.ndarray:
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos)).logits.numpy()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    build_hf("llama", folder, tied=False)
    return folder


@pytest.mark.parametrize("kind,tied", [("llama", False), ("qwen2", True)])
def test_save_then_transformers_load_gives_identical_logits(tmp_path, kind, tied):
    hf = build_hf(kind, tmp_path / "src", tied)
    model = load_hf(tmp_path / "src")
    tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "qwen2.5")
    save_hf(model, tmp_path / "out", tokenizer=tok)
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    assert (tmp_path / "out" / "config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(hf)
    assert reloaded.config.tie_word_embeddings == tied
    tokens, mask = random_batch(model.config.vocab_size)
    real = mask.astype(bool)
    ours = forward(model, tokens, mask)
    np.testing.assert_array_equal(torch_logits(reloaded, tokens, mask)[real],
                                  torch_logits(hf, tokens, mask)[real])
    np.testing.assert_allclose(ours[real], torch_logits(reloaded, tokens, mask)[real],
                               atol=1e-4, rtol=0)
    # and back into Flax: exactly the same parameters
    again = load_hf(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_save_and_load_round_trip(tmp_path):
    model = load_hf(STORIES)
    save_hf(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / s).exists() for s in shards)
    again = load_hf(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hf = LlamaForCausalLM.from_pretrained(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(STORIES)
    for (n1, p1), (n2, p2) in zip(hf.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_bfloat16_save_and_load(tmp_path):
    model = load_hf(STORIES, param_dtype="bfloat16")
    save_hf(model, tmp_path)
    assert load_file(tmp_path / "model.safetensors")["model.norm.weight"].dtype.name == "bfloat16"
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = LlamaForCausalLM.from_pretrained(tmp_path)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    again = load_hf(tmp_path, param_dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(again.embed[...]), np.asarray(model.embed[...]))


def test_placement_with_sharding_function_pytree_and_single(llama_dir):
    mesh = jax.make_mesh((1,), ("fsdp",))
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    seen = []

    def by_path(path: str):
        seen.append(path)
        return row if path.endswith("kernel") else repl

    ref = load_hf(llama_dir)
    model = load_hf(llama_dir, sharding=by_path)
    assert "layers.1.attn.q_proj.kernel" in seen and "lm_head" in seen
    assert model.layers[0].mlp.up_proj.kernel[...].sharding == row
    assert model.final_norm.weight[...].sharding == repl
    np.testing.assert_array_equal(np.asarray(model.layers[1].attn.q_proj.kernel[...]),
                                  np.asarray(ref.layers[1].attn.q_proj.kernel[...]))
    _, state = nnx.split(ref)
    tree = jax.tree.map(lambda _: repl, state)
    graphdef, params = load_hf_params(llama_dir, ref.config, sharding=tree)
    assert all(x.sharding == repl for x in jax.tree.leaves(params))
    model = load_hf(llama_dir, sharding=repl)
    assert model.embed[...].sharding == repl


def test_lazy_reads_of_transposed_slices(llama_dir):
    """A sharded placement reads only index slices; check they land transposed right."""
    ref = load_hf(llama_dir)
    from safetensors import safe_open
    with safe_open(llama_dir / "model.safetensors", framework="numpy") as f:
        read = hf_io._read_fn(f.get_slice("model.layers.0.mlp.up_proj.weight"), True,
                              np.float32)
        block = read((slice(3, 9), slice(None, 5)))
    np.testing.assert_array_equal(
        block, np.asarray(ref.layers[0].mlp.up_proj.kernel[...])[3:9, :5])


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_tensor_is_named(llama_dir, tmp_path):
    bad = _rewrite(llama_dir, tmp_path / "bad",
                   lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(WeightLoadError,
                       match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load_hf(bad)


def test_wrong_shape_is_named(llama_dir, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :-1]
    bad = _rewrite(llama_dir, tmp_path / "bad", edit)
    with pytest.raises(WeightLoadError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' "
                                              r"has shape \(36, 43\), expected \(36, 44\)") as e:
        load_hf(bad)
    assert "missing" not in str(e.value)


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    def edit(t):
        t["model.layers.2.self_attn.q_proj.weight"] = np.zeros((36, 36), np.float32)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((6,), np.float32)
    bad = _rewrite(llama_dir, tmp_path / "bad", edit)
    with pytest.raises(WeightLoadError) as e:
        load_hf(bad)
    msg = str(e.value)
    assert "unexpected tensor 'model.layers.2.self_attn.q_proj.weight'" in msg
    assert "inv_freq" not in msg  # redundant buffers are skipped, not errors
    model = load_hf(bad, strict=False)
    assert model.config.num_layers == 2


def test_all_problems_reported_at_once(llama_dir, tmp_path):
    def edit(t):
        t.pop("model.norm.weight")
        t["model.embed_tokens.weight"] = t["model.embed_tokens.weight"][:10]
        t["extra.weight"] = np.ones((2,), np.float32)
    bad = _rewrite(llama_dir, tmp_path / "bad", edit)
    with pytest.raises(WeightLoadError) as e:
        load_hf(bad)
    msg = str(e.value)
    for name in ("model.norm.weight", "model.embed_tokens.weight", "extra.weight"):
        assert repr(name) in msg


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text((STORIES / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="never loaded"):
        load_hf(tmp_path)


def test_hub_ids_go_through_snapshot_download(monkeypatch):
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(STORIES)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_hf("someone/stories260K", revision="main")
    assert calls["repo_id"] == "someone/stories260K" and calls["revision"] == "main"
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl")) for p in calls["allow_patterns"])
    assert model.config.vocab_size == 512


def test_name_table_is_a_bijection_on_model_params():
    model = load_hf(STORIES)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))]
    names = [hf_io.param_to_hf(p)[0] for p in paths]
    assert len(set(names)) == len(names)
    assert [hf_io.hf_to_param(n)[0] for n in names] == paths
    assert hf_io.hf_to_param("model.layers.12.self_attn.o_proj.weight") == (
        "layers.12.attn.o_proj.kernel", True)
    assert hf_io.hf_to_param("model.layers.x.mlp.up_proj.weight") is None
    assert len(WEIGHT_RULES) < 12


# ----------------------------------------------------------------------------- bad folders


def test_integer_tensor_is_refused_by_name(llama_dir, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = (
            100 * t["model.layers.0.mlp.up_proj.weight"]).astype(np.int32)
    bad = _rewrite(llama_dir, tmp_path / "bad", edit)
    with pytest.raises(WeightLoadError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' "
                                              r"holds I32 values"):
        load_hf(bad)


def test_broken_config_names_file_and_field(llama_dir, tmp_path):
    bad = _rewrite(llama_dir, tmp_path / "bad", lambda t: None)
    (bad / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_hf(bad)
    cfg = json.loads((llama_dir / "config.json").read_text())
    del cfg["num_attention_heads"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: missing field\(s\) num_attention_heads"):
        load_hf(bad)
    cfg["num_attention_heads"] = "three"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"field num_attention_heads must be a positive integer"):
        load_hf(bad)


def test_index_without_weight_map_names_file_and_field(llama_dir, tmp_path):
    bad = _rewrite(llama_dir, tmp_path / "bad", lambda t: None)
    (bad / hf_io.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(WeightLoadError, match=r"index\.json: field weight_map"):
        load_hf(bad)
    (bad / hf_io.SAFETENSORS_INDEX).write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(WeightLoadError, match="do not exist: model-00002-of-00002"):
        load_hf(bad)


def test_truncated_safetensors_names_the_file(llama_dir, tmp_path):
    bad = _rewrite(llama_dir, tmp_path / "bad", lambda t: None)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(WeightLoadError, match=r"model\.safetensors is not a readable"):
        load_hf(bad)


@pytest.mark.parametrize("path", ["runs/does-not-exist/final_model", "./missing", "/no/such",
                                  "tests/no-such-model"])
def test_missing_local_folder_is_an_error_not_a_hub_lookup(monkeypatch, path):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: pytest.fail(f"hub lookup of {kw}"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(path)


@pytest.mark.parametrize("offline", [True, False])
def test_name_found_neither_locally_nor_on_the_hub_is_named(monkeypatch, tmp_path, offline):
    """A bare name with no folder goes to the hub; when that fails the error names the
    argument and both places it was looked for (not only the hub client's message)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: fails fast
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(FileNotFoundError,
                       match=r"model 'no_such_folder' not found: no local folder .*Hub"):
        load_hf("no_such_folder")
