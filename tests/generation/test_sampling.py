"""KV-cache sampler and chunked log-probs: against full forward passes and against
transformers' greedy generate; chat-template encoding; the benchmark's smoke run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from sparsejax.generation import sampler as sampling
from sparsejax.models import apply, completion_logprobs, load_hf, logprobs_from_hidden, token_logprobs

from paths import REPO
from references import cached_logits

ROOT = REPO
SHARED = ROOT.parent / "shared"

#: Shared by several tests so that they reuse one compiled decode loop.
SAMPLED = sampling.SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9,
                                  stop_token_ids=(2,))


def build_hf(kind: str, folder: Path, seed: int = 0):
    """A tiny random transformers model (GQA 3:1, odd heads) saved to ``folder``."""
    torch.manual_seed(seed)
    common = dict(vocab_size=71, hidden_size=36, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, head_dim=12,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind == "llama":
        hf = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}))
    else:
        hf = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name
                    else 0.25 * torch.randn_like(p))
    hf.eval().save_pretrained(folder)
    return hf


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_hf(request.param, folder)
    model = load_hf(folder)
    return hf, model


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory):
    """One tiny tied-embedding model for the tests that need only one."""
    folder = tmp_path_factory.mktemp("qwen_single")
    build_hf("qwen2", folder, seed=1)
    return load_hf(folder)


def prompts(vocab: int, seed: int = 0):
    """Three left-padded prompts of lengths 7, 4 and 6 (random ids, no special tokens)."""
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(3, vocab, n).tolist() for n in (7, 4, 6)]
    return sampling.left_pad(seqs, pad_id=0)


def test_kv_cache_decode_logits_equal_full_forward(tiny):
    _, model = tiny
    graphdef, params = nnx.split(model)
    tokens, mask = prompts(model.config.vocab_size)
    rng = np.random.default_rng(1)
    steps = 5
    cont = rng.integers(3, model.config.vocab_size, (tokens.shape[0], steps))
    full_tokens = np.concatenate([tokens, cont], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(cont)], axis=1)
    full = np.asarray(jax.jit(apply, static_argnums=0)(
        graphdef, params, jnp.asarray(full_tokens), jnp.asarray(full_mask)))

    p = tokens.shape[1]
    got, cache = cached_logits(sampling, model.config, graphdef, params, tokens, mask, cont,
                               p + steps + 3)
    np.testing.assert_allclose(got, full[:, p - 1:], atol=1e-4, rtol=0)
    assert int(cache.index) == p + steps
    np.testing.assert_array_equal(np.asarray(cache.next_pos), mask.sum(1) + steps)


def test_greedy_equals_transformers_generate_with_stop_token(tiny):
    hf, model = tiny
    graphdef, params = nnx.split(model)
    tokens, mask = prompts(model.config.vocab_size, seed=3)
    n = 12

    def hf_greedy(eos):
        hf.generation_config.eos_token_id = eos
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                              attention_mask=torch.tensor(mask, dtype=torch.long),
                              do_sample=False, max_new_tokens=n, pad_token_id=0)
        return out[:, tokens.shape[1]:].numpy()

    free = hf_greedy(None)
    stop = int(free[0, 3])                           # make row 0 stop at step <= 3
    ref = hf_greedy(stop)
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])))   # HF stops once all rows are done
    out = sampling.generate(graphdef, params, tokens, mask, jax.random.key(0),
                            sampling.SamplingParams(max_new_tokens=n, temperature=0.0,
                                                    stop_token_ids=(stop,)), pad_id=0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    first = int(np.argmax(free[0] == stop))
    expected_mask = (np.arange(n) <= first).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(out.mask[0]), expected_mask)
    assert int(out.lengths[0]) == first + 1
    assert (np.asarray(out.logprobs[0])[first + 1:] == 0).all()
    assert (np.asarray(out.logprobs)[np.asarray(out.mask) == 1] < 0).all()


def test_sampler_logprobs_equal_completion_logprobs(tiny):
    _, model = tiny
    graphdef, params = nnx.split(model)
    tokens, mask = prompts(model.config.vocab_size, seed=5)
    out = sampling.generate(graphdef, params, tokens, mask, jax.random.key(7), SAMPLED)
    assert int(out.mask.sum()) > 0
    ref = jax.jit(completion_logprobs, static_argnums=0,
                  static_argnames=("temperature", "chunk_size"))(
        graphdef, params, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask,
        temperature=SAMPLED.temperature, chunk_size=4)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref), atol=1e-4, rtol=0)


def test_sampling_is_deterministic_in_the_key(tiny):
    _, model = tiny
    graphdef, params = nnx.split(model)
    tokens, mask = prompts(model.config.vocab_size, seed=5)
    runs = [sampling.generate(graphdef, params, tokens, mask, jax.random.key(k), SAMPLED)
            for k in (11, 11, 12)]
    np.testing.assert_array_equal(np.asarray(runs[0].tokens), np.asarray(runs[1].tokens))
    np.testing.assert_array_equal(np.asarray(runs[0].logprobs), np.asarray(runs[1].logprobs))
    assert not np.array_equal(np.asarray(runs[0].tokens), np.asarray(runs[2].tokens))


def test_top_k_one_is_greedy(qwen_tiny):
    graphdef, params = nnx.split(qwen_tiny)
    tokens, mask = prompts(qwen_tiny.config.vocab_size, seed=8)
    greedy = sampling.generate(graphdef, params, tokens, mask, jax.random.key(0),
                               sampling.SamplingParams(max_new_tokens=8, temperature=0.0))
    top1 = sampling.generate(graphdef, params, tokens, mask, jax.random.key(0),
                             sampling.SamplingParams(max_new_tokens=8, temperature=1.3,
                                                     top_k=1))
    np.testing.assert_array_equal(np.asarray(greedy.tokens), np.asarray(top1.tokens))


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    keep = lambda **kw: np.isfinite(np.asarray(sampling.filter_logits(
        logits, sampling.SamplingParams(temperature=1.0, **kw))))
    np.testing.assert_array_equal(keep(top_k=2), [[1, 0, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(keep(top_p=0.75)[0], [1, 0, 1, 0])
    np.testing.assert_array_equal(keep(top_p=0.81)[0], [1, 0, 1, 1])
    np.testing.assert_array_equal(keep(top_p=0.1)[0], [1, 0, 0, 0])
    assert keep(top_p=0.5)[1].all()   # ties at the threshold are all kept


def test_prompt_bucketing_avoids_recompiles(qwen_tiny):
    graphdef, params = nnx.split(qwen_tiny)
    rng = np.random.default_rng(0)
    before = None
    for lengths, width in (((5, 3, 1), 5), ((7, 2, 8), 9), ((8, 6, 4), 16)):
        seqs = [rng.integers(3, 50, n).tolist() for n in lengths]
        tokens, mask = sampling.left_pad(seqs, pad_id=0, length=width)
        out = sampling.generate(graphdef, params, tokens, mask, jax.random.key(0), SAMPLED)
        assert out.prompt_tokens.shape == (3, 8)
        size = sampling.generate_program._cache_size()
        assert before is None or size == before
        before = size
    assert [sampling.bucket_length(n) for n in (1, 9, 64, 65, 200)] == [8, 16, 64, 128, 256]


def test_chunked_logprobs_equal_unchunked(qwen_tiny):
    graphdef, params = nnx.split(qwen_tiny)
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(3, qwen_tiny.config.vocab_size, (3, 21)))
    mask = np.ones((3, 21), np.int32)
    mask[2, :6] = 0
    mask = jnp.asarray(mask)
    temperature = 0.8

    def unchunked(p):
        z = apply(graphdef, p, tokens, mask)[:, :-1] / temperature
        logp_all = jax.nn.log_softmax(z, axis=-1)
        logp = jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]
        ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
        return logp, ent

    def chunked(p):
        return token_logprobs(graphdef, p, tokens, mask, temperature=temperature,
                              chunk_size=7, return_entropy=True)

    (lp_a, ent_a), (lp_b, ent_b) = jax.jit(unchunked)(params), jax.jit(chunked)(params)
    np.testing.assert_allclose(np.asarray(lp_b), np.asarray(lp_a), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ent_b), np.asarray(ent_a), atol=1e-5, rtol=0)
    assert float(jnp.abs(ent_a).min()) > 0.0

    weights = jnp.asarray(rng.normal(size=lp_a.shape), jnp.float32) * mask[:, 1:]
    loss = lambda f: lambda p: jnp.sum(f(p)[0] * weights) + jnp.sum(f(p)[1])
    ga = jax.jit(jax.grad(loss(unchunked)))(params)
    gb = jax.jit(jax.grad(loss(chunked)))(params)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)

    # completion_logprobs reads the same numbers at the completion positions
    comp = jax.jit(lambda p: completion_logprobs(
        graphdef, p, tokens[:, :13], mask[:, :13], tokens[:, 13:], mask[:, 13:],
        temperature=temperature, chunk_size=3))(params)
    np.testing.assert_allclose(np.asarray(comp), np.asarray(lp_a[:, 12:]), atol=1e-5, rtol=0)


def test_logprobs_from_hidden_chunk_sizes_agree():
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 50, (2, 9)))
    ref = jnp.take_along_axis(jax.nn.log_softmax(h @ w / 1.5), t[..., None], -1)[..., 0]
    for chunk in (1, 4, 1000):
        got = jax.jit(lambda h, w, t, c=chunk: logprobs_from_hidden(
            h, w, t, temperature=1.5, chunk_size=c))(h, w, t)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        logprobs_from_hidden(h, w, t, temperature=0.0)


@pytest.mark.parametrize("name", ["qwen2.5", "llama3"])
def test_encode_chat_with_chat_template(name):
    tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / name)
    chats = ["What is 2 + 3?",
             [{"role": "system", "content": "Answer in \\boxed{}."},
              {"role": "user", "content": "A longer question about twelve apples?"}]]
    tokens, mask = sampling.encode_chat(tok, chats)
    assert tokens.shape == mask.shape and tokens.shape[1] == sampling.bucket_length(
        int(mask.sum(1).max()))
    for row, chat in enumerate(chats):
        messages = [{"role": "user", "content": chat}] if isinstance(chat, str) else chat
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        real = tokens[row][mask[row] == 1].tolist()
        assert real == ids
        assert (tokens[row][mask[row] == 0] == sampling.pad_token_id(tok)).all()
        assert mask[row][-1] == 1 and (np.diff(mask[row]) >= 0).all()   # left padded
    decoded = tok.decode(tokens[1][mask[1] == 1].tolist())
    if name == "qwen2.5":
        assert decoded.startswith("<|im_start|>system\nAnswer in")
        assert decoded.endswith("<|im_start|>assistant\n")
        assert sampling.pad_token_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")
    else:
        first = tokens[0][mask[0] == 1].tolist()
        assert first[0] == 128000 and first.count(128000) == 1   # one BOS, from the template
        assert decoded.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_bench_sampler_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_sampler", ROOT / "experiments" / "bench_sampler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    assert "--slots" in capsys.readouterr().out
    defaults = bench.parse_args([])
    assert (defaults.model, defaults.prompts, defaults.samples, defaults.new_tokens) == (
        "SmolLM2-135M", 8, 8, 256)
    with pytest.raises(SystemExit):
        bench.parse_args(["--chunk-size", "0"])
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--out", str(out)])
    report = json.loads(out.read_text())
    for key in ("device", "versions", "date", "git_commit", "command", "load_average",
                "bandwidth_gbps", "results"):
        assert key in report
    by = {r["sampler"]: r for r in report["results"]}
    assert set(by) == {"slots", "batch", "hf"}
    for r in by.values():
        assert r["tokens_per_s"] > 0 and 0 < r["occupancy"] <= 1
        assert r["decode_steps"] >= r["useful_tokens"] / r["rows"]
        assert r["floor_step_ms"] > 0
    # the same workload everywhere: 2 prompts x 3 samples
    assert by["slots"]["length_stats"]["max"] <= 12
