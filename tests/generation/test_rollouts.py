"""The slot sampler (sparsejax.generation.rollouts): greedy parity with transformers' generate and the
batch sampler, determinism whatever the slot count, log-probs, the inverse-CDF draw, the
chunked decode attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_sampling import build_hf, prompts
from transformers import AutoTokenizer, LlamaForCausalLM

from sparsejax.generation import rollouts, slot_attention
from sparsejax.generation import sampler as sampling
from sparsejax.models import completion_logprobs, load_hf
from sparsejax.models.decoder import _xla_attention

from paths import SHARED
from references import hf_greedy

#: Sampled settings of these tests: top-k and top-p on, ten stop tokens (so some
#: completions stop early and others run to the budget).
SAMPLED = sampling.SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9,
                                  stop_token_ids=tuple(range(2, 12)))
STORIES = SHARED / "models" / "stories260K"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return build_hf(request.param, folder), load_hf(folder)


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen_rollouts")
    build_hf("qwen2", folder, seed=2)
    return load_hf(folder)



def test_greedy_equals_transformers_and_batch_sampler(tiny):
    """3 prompts x 2 samples through 2 slots (refills happen), one early stop token."""
    hf, model = tiny
    graphdef, params = nnx.split(model)
    tokens, mask = prompts(model.config.vocab_size, seed=3)
    n = 12
    stop = int(hf_greedy(hf, tokens, mask, n, None)[0, 3])
    ref = hf_greedy(hf, tokens, mask, n, stop)
    greedy = sampling.SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=(stop,))
    out = rollouts.rollout(graphdef, params, tokens, mask, jax.random.key(0), greedy,
                           num_samples=2, num_slots=2, chunk_size=8)
    np.testing.assert_array_equal(out.tokens, np.repeat(ref, 2, axis=0))
    old = sampling.generate(graphdef, params, tokens, mask, jax.random.key(0), greedy)
    for name in ("tokens", "mask", "lengths", "prompt_tokens", "prompt_mask"):
        np.testing.assert_array_equal(getattr(out, name),
                                      np.repeat(np.asarray(getattr(old, name)), 2, axis=0))
    np.testing.assert_allclose(out.logprobs, np.repeat(np.asarray(old.logprobs), 2, 0),
                               atol=1e-5, rtol=0)
    assert out.lengths[0] < n and out.stats.useful_tokens == out.mask.sum()
    st = out.stats
    assert st.decode_steps <= st.slot_steps <= 2 * st.decode_steps
    assert st.occupancy == pytest.approx(st.useful_tokens / st.slot_steps)
    assert st.decode_steps >= st.useful_tokens / 2


def test_stories260k_greedy_equals_transformers():
    tok = AutoTokenizer.from_pretrained(STORIES)
    hf = LlamaForCausalLM.from_pretrained(STORIES).eval()
    texts = ["Once upon a time", "The little dog"]
    tokens, mask = sampling.encode_prompts(tok, texts)        # left padded, bucketed
    n = 24
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n,
                          pad_token_id=0)[:, tokens.shape[1]:].numpy()
    graphdef, params = nnx.split(load_hf(STORIES))
    out = rollouts.rollout(graphdef, params, tokens, mask, jax.random.key(0),
                           sampling.SamplingParams(max_new_tokens=n, temperature=0.0),
                           num_samples=1, num_slots=1, chunk_size=16)
    np.testing.assert_array_equal(out.tokens, ref)
    assert tok.decode(out.tokens[0]).startswith(", there was a little girl named Lily")


def test_sampled_tokens_do_not_depend_on_slots_and_logprobs_match(qwen_tiny):
    graphdef, params = nnx.split(qwen_tiny)
    tokens, mask = prompts(qwen_tiny.config.vocab_size, seed=5)
    run = lambda key, slots, **kw: rollouts.rollout(
        graphdef, params, tokens, mask, jax.random.key(key), SAMPLED, num_samples=3,
        num_slots=slots, chunk_size=4, **kw)
    a, b, c, d = run(11, 2), run(11, 8), run(11, 2), run(12, 2)
    # one width vs 8 -> 4 -> 2 in the tail: the same tokens, fewer rows computed
    e = run(11, 8, width_buckets=1)
    np.testing.assert_array_equal(e.tokens, b.tokens)
    np.testing.assert_allclose(e.logprobs, b.logprobs, atol=1e-6, rtol=0)
    assert e.stats.slot_steps == 8 * e.stats.decode_steps
    assert b.stats.slot_steps < e.stats.slot_steps and b.stats.occupancy > e.stats.occupancy
    assert a.stats.compile_s > 0 and c.stats.compile_s == 0       # one program per shape
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(a.tokens, c.tokens)
    np.testing.assert_array_equal(a.logprobs, c.logprobs)
    assert not np.array_equal(a.tokens, d.tokens)
    # the G samples of a prompt differ, and some stop before the budget
    assert not np.array_equal(a.tokens[0], a.tokens[1])
    assert (a.lengths < SAMPLED.max_new_tokens).any() and (a.lengths > 1).any()
    assert b.stats.decode_steps < a.stats.decode_steps
    # stop tokens: the mask ends at the first one; nothing but pad after it
    for row, length in zip(a.tokens, a.lengths):
        assert (row[length:] == 0).all()
        if length < SAMPLED.max_new_tokens:
            stops = np.isin(row[:length], SAMPLED.stop_token_ids)
            assert stops[-1] and not stops[:-1].any()
    ref = jax.jit(completion_logprobs, static_argnums=0,
                  static_argnames=("temperature", "chunk_size"))(
        graphdef, params, a.prompt_tokens, a.prompt_mask, a.tokens, a.mask,
        temperature=SAMPLED.temperature, chunk_size=8)
    np.testing.assert_allclose(a.logprobs, np.asarray(ref), atol=1e-4, rtol=0)
    # top-k: every sampled token is among the 20 most likely of its position
    z = jax.jit(lambda p: nnx.merge(graphdef, p)(
        jnp.concatenate([a.prompt_tokens, a.tokens], 1),
        jnp.concatenate([a.prompt_mask, a.mask], 1)))(params)
    p = a.prompt_tokens.shape[1]
    z = np.asarray(z)[:, p - 1:p - 1 + SAMPLED.max_new_tokens]
    rank = (z > np.take_along_axis(z, a.tokens[..., None], -1)).sum(-1)
    assert (rank[a.mask == 1] < SAMPLED.top_k).all()


@pytest.mark.parametrize("kw", [dict(), dict(top_k=40, top_p=0.6), dict(temperature=0.5)])
def test_inverse_cdf_draw_follows_the_filtered_distribution(kw):
    rng = np.random.default_rng(0)
    vocab, n = 520, 12000                     # 520: three blocks, a ragged last one
    logits = jnp.asarray(rng.normal(size=(2, vocab)) * 1.5, jnp.float32)
    sp = sampling.SamplingParams(**{"temperature": 1.0, **kw})
    probs = np.asarray(jax.nn.softmax(sampling.filter_logits(logits, sp), axis=-1))
    u = jax.random.uniform(jax.random.key(1), (n,))
    draw = jax.jit(lambda l, u: rollouts.sample_from_uniform(l, u, sp))
    for row in range(2):
        tok, logp = draw(jnp.broadcast_to(logits[row], (n, vocab)), u)
        tok = np.asarray(tok)
        emp = np.bincount(tok, minlength=vocab) / n
        assert (probs[row][tok] > 0).all()                   # never a filtered token
        assert np.abs(emp - probs[row]).max() < 4 * np.sqrt(probs[row].max() / n) + 1e-3
        full = np.asarray(jax.nn.log_softmax(logits[row] / sp.temperature))
        np.testing.assert_allclose(np.asarray(logp), full[tok], atol=1e-5)
    edge = draw(logits, jnp.asarray([0.0, 1.0 - 2.0 ** -24]))[0]
    assert (probs[np.arange(2), np.asarray(edge)] > 0).all()


def test_chunked_decode_attention_equals_full_masked_attention():
    rng = np.random.default_rng(0)
    s, h, kv, d, chunk, c = 4, 6, 2, 8, 4, 20
    q = jnp.asarray(rng.normal(size=(s, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(s, kv, c, d)), jnp.float32) for _ in range(2))
    fill = np.array([3, 9, 14, 0])          # ragged: inside a chunk, on a boundary, none
    valid = np.arange(c)[None] < fill[:, None]
    ref = _xla_attention(q[:, None], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                         jnp.asarray(valid)[:, None])[:, 0]
    fn = jax.jit(slot_attention.chunked_decode_attention, static_argnums=5)
    kt = k.transpose(0, 1, 3, 2)                              # keys stored [S, kv, D, C]
    got = fn(q, kt, v, jnp.asarray(fill), 4, chunk)           # 16 of 20 slots: enough
    np.testing.assert_allclose(np.asarray(got[:3]), np.asarray(ref[:3]), atol=1e-5)
    assert (np.asarray(got[3]) == 0).all()                   # nothing valid: zeros
    more = fn(q, kt, v, jnp.asarray(fill), 5, chunk)         # an extra all-masked chunk
    np.testing.assert_array_equal(np.asarray(more), np.asarray(got))
    # garbage past a row's fill changes nothing
    noise = jnp.asarray(rng.normal(size=kt.shape), jnp.float32)
    dirty = fn(q, jnp.where(jnp.asarray(valid)[:, None, None], kt, noise), v,
               jnp.asarray(fill), 4, chunk)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(got))


def test_prompt_then_generated_attention_equals_full_masked_attention():
    rng = np.random.default_rng(1)
    num_prompts, n, h, kv, d, chunk, lp, c = 2, 3, 6, 2, 8, 4, 8, 8
    s = num_prompts * n
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q, pk, pv, k, v = (normal(s, h, d), normal(num_prompts, kv, lp, d),
                       normal(num_prompts, kv, lp, d), normal(s, kv, c, d), normal(s, kv, c, d))
    prompt_len = np.array([5, 8])
    fill = np.array([0, 3, 4, 7, 1, 0])        # generated keys: none, ragged, a full chunk
    row_prompt = np.arange(s) // n
    valid = np.concatenate([np.arange(lp)[None] < prompt_len[row_prompt][:, None],
                            np.arange(c)[None] < fill[:, None]], axis=1)
    keys = jnp.concatenate([pk[row_prompt], k], axis=2)           # [S, kv, Lp + C, D]
    values = jnp.concatenate([pv[row_prompt], v], axis=2)
    ref = _xla_attention(q[:, None], keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3),
                         jnp.asarray(valid)[:, None])[:, 0]

    def attend(grouped, prompt_chunks):
        state = slot_attention.prompt_attention_state(
            q, pk.transpose(0, 1, 3, 2), pv, jnp.asarray(prompt_len), jnp.asarray(row_prompt),
            grouped, prompt_chunks, chunk)
        return slot_attention.chunked_decode_attention(
            q, k.transpose(0, 1, 3, 2), v, jnp.asarray(fill), 2, chunk, init=state)

    together, gathered = attend(True, 2), attend(False, 2)
    np.testing.assert_allclose(np.asarray(together), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(gathered), np.asarray(ref), atol=1e-5)
    # only the prompt chunks a row fills are read: fewer change the result
    assert not np.allclose(np.asarray(attend(True, 1)[n:]), np.asarray(ref[n:]), atol=1e-3)


def test_samples_attending_to_their_prompt_together_and_capacity_change_no_token(qwen_tiny):
    graphdef, params = nnx.split(qwen_tiny)
    tokens, mask = prompts(qwen_tiny.config.vocab_size, seed=5)
    total = tokens.shape[0] * 3
    run = lambda slots, tokens=tokens, mask=mask, **kw: rollouts.rollout(
        graphdef, params, tokens, mask, jax.random.key(11), SAMPLED, num_samples=3,
        num_slots=slots, chunk_size=4, **kw)
    apart, together = run(2), run(total)             # one sequence per slot: grouped
    np.testing.assert_array_equal(together.tokens, apart.tokens)
    np.testing.assert_allclose(together.logprobs, apart.logprobs, atol=1e-5, rtol=0)
    # room for longer prompts: the same bits
    rng = np.random.default_rng(6)
    long_tokens, long_mask = sampling.left_pad(
        [rng.integers(3, qwen_tiny.config.vocab_size, n).tolist() for n in (12, 9, 11)], 0)
    exact = run(total, long_tokens, long_mask)
    wide = run(total, long_tokens, long_mask, prompt_capacity=40)
    np.testing.assert_array_equal(wide.tokens, exact.tokens)
    np.testing.assert_array_equal(wide.logprobs, exact.logprobs)
    # shorter prompts (another width bucket) reuse the decode program: one new prefill
    compiled = len(rollouts._COMPILED)
    short = run(total, prompt_capacity=40)
    assert short.prompt_tokens.shape[1] < wide.prompt_tokens.shape[1]
    assert len(rollouts._COMPILED) == compiled + 1 and short.stats.compile_s > 0


def test_rollout_rejects_bad_input(qwen_tiny):
    graphdef, params = nnx.split(qwen_tiny)
    tokens, mask = prompts(qwen_tiny.config.vocab_size)
    key = jax.random.key(0)
    for kwargs, word in ((dict(num_samples=0), "num_samples"), (dict(num_slots=0), "num_slots"),
                         (dict(chunk_size=0), "chunk_size")):
        with pytest.raises(ValueError, match=word):
            rollouts.rollout(graphdef, params, tokens, mask, key, SAMPLED, **kwargs)
    with pytest.raises(ValueError, match="prompt_mask"):
        rollouts.rollout(graphdef, params, tokens, np.zeros_like(mask), key, SAMPLED)
    with pytest.raises(ValueError, match="prompt_tokens"):
        rollouts.rollout(graphdef, params, tokens[:, :-1], mask, key, SAMPLED)


def test_batch_sharding_on_one_device_gives_the_same_tokens(qwen_tiny):
    graphdef, params = nnx.split(qwen_tiny)
    tokens, mask = prompts(qwen_tiny.config.vocab_size, seed=7)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    run = lambda **kw: rollouts.rollout(
        graphdef, params, tokens, mask, jax.random.key(3), SAMPLED, num_samples=2,
        num_slots=4, chunk_size=4, **kw)
    ref, got = run(), run(batch_sharding=sharding)
    assert got.stats.compile_s > 0                       # its own program
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.logprobs, ref.logprobs)
    with pytest.raises(ValueError, match="batch_sharding"):
        run(batch_sharding="data")
