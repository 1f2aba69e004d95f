"""Mask constructors, metrics, conversion, files and validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsejax as sj

shapes_st = st.lists(
    st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)
sparsity_st = st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99])


def shape_tree(shapes):
    return {f"t{i}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}


def qwen25_05b_shapes():
    """Qwen2.5-0.5B parameter shapes from its public config (tied embeddings)."""
    vocab, hidden, inter, layers, heads, kv_heads, head_dim = 151936, 896, 4864, 24, 14, 2, 64
    tree = {"embed": (vocab, hidden), "norm": (hidden,)}
    for i in range(layers):
        tree[f"layers/{i}"] = {
            "q": (hidden, heads * head_dim), "q_bias": (heads * head_dim,),
            "k": (hidden, kv_heads * head_dim), "k_bias": (kv_heads * head_dim,),
            "v": (hidden, kv_heads * head_dim), "v_bias": (kv_heads * head_dim,),
            "o": (heads * head_dim, hidden), "gate": (hidden, inter), "up": (hidden, inter),
            "down": (inter, hidden), "norm1": (hidden,), "norm2": (hidden,)}
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def test_multiple_ticket_count_on_qwen25_05b():
    params = qwen25_05b_shapes()
    expected = sum(math.floor(0.01 * math.prod(p.shape)) for p in jax.tree.leaves(params))
    assert expected == 4_940_162
    mask = sj.random_mask(params, 0.99, seed=0)
    assert sj.num_active(mask) == 4_940_162
    sj.validate_mask(mask, params)


def check_sorted_unique_in_range(mask, params):
    for idx, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params)):
        flat = np.asarray(idx).reshape(-1)
        assert idx.dtype == np.int32
        assert np.all(np.diff(flat) > 0)
        assert flat.size == 0 or (flat[0] >= 0 and flat[-1] < math.prod(p.shape))


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_st, sparsity=sparsity_st, seed=st.integers(0, 2**31 - 1))
def test_random_mask_properties(shapes, sparsity, seed):
    params = shape_tree(shapes)
    numels = [math.prod(s) for s in shapes]
    per = sj.random_mask(params, sparsity, seed=seed)
    assert [np.size(i) for i in jax.tree.leaves(per)] == [
        math.floor((1 - sparsity) * n) for n in numels]
    glob = sj.random_mask(params, sparsity, seed=seed, strategy="global")
    assert sj.num_active(glob) == round((1 - sparsity) * sum(numels))
    rows = sj.random_mask(params, sparsity, seed=seed, strategy="row_balanced")
    for idx, s in zip(jax.tree.leaves(rows), shapes):
        cols = s[-1] if s else 1
        c = round((1 - sparsity) * cols)
        if c:
            assert idx.shape == (math.prod(s[:-1]) if s else 1, c)
    for m in (per, glob, rows):
        sj.validate_mask(m, params)
        check_sorted_unique_in_range(m, params)
    # Deterministic for a seed; a different seed draws a different mask.
    again = sj.random_mask(params, sparsity, seed=seed)
    for a, b in zip(jax.tree.leaves(per), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_seeds_differ_and_jaccard_is_chance_level():
    params = {"w": jax.ShapeDtypeStruct((400, 500), jnp.float32),
              "v": jax.ShapeDtypeStruct((3000,), jnp.float32)}
    for p in (0.1, 0.01):
        a = sj.random_mask(params, 1 - p, seed=1)
        b = sj.random_mask(params, 1 - p, seed=2)
        assert not np.array_equal(a["w"], b["w"])
        chance = p / (2 - p)
        assert abs(sj.jaccard(a, b) - chance) < 0.1 * chance
        baseline = sj.random_baselines(a, b, 400 * 500 + 3000)
        assert baseline["jaccard"] == pytest.approx(chance, rel=1e-3)
        o1, o2 = sj.overlap(a, b)
        assert abs(o1 - baseline["o1"]) < 0.1 * p and abs(o2 - baseline["o2"]) < 0.1 * p


def test_include_exclude_select_tensors_by_path():
    params = {"layers": [{"attn": {"q": jnp.ones((8, 8))}, "mlp": {"up": jnp.ones((8, 16))}}
                         for _ in range(2)], "embed": jnp.ones((10, 8))}
    m = sj.random_mask(params, 0.5, include=r"layers/\d+/mlp", exclude=r"layers/1/")
    assert np.size(m["layers"][0]["mlp"]["up"]) == 64
    assert np.size(m["layers"][1]["mlp"]["up"]) == 0
    assert np.size(m["layers"][0]["attn"]["q"]) == 0 and np.size(m["embed"]) == 0


def test_topk_exact_k_and_tie_breaking():
    rng = np.random.default_rng(0)
    scores = {"a": rng.integers(0, 4, size=(30, 7)).astype(np.float32),
              "b": rng.integers(0, 4, size=(50,)).astype(np.float32)}
    n = 30 * 7 + 50
    for sparsity in (0.0, 0.5, 0.77, 0.99):
        m = sj.topk_mask(scores, sparsity)
        k = round((1 - sparsity) * n)
        assert sj.num_active(m) == k
        # Reference: a stable sort by descending score keeps tree order among ties.
        flat = np.concatenate([scores["a"].ravel(), scores["b"].ravel()])
        chosen = np.sort(np.argsort(-flat, kind="stable")[:k])
        got = np.concatenate([m["a"], m["b"] + 210])
        np.testing.assert_array_equal(got, chosen)
    per = sj.topk_mask(scores, 0.6, scope="per_tensor")
    assert np.size(per["a"]) == round(0.4 * 210) and np.size(per["b"]) == round(0.4 * 50)


def test_topk_min_keep_per_tensor():
    scores = {"big": np.linspace(1, 2, 1000, dtype=np.float32),
              "small": np.linspace(0, 0.5, 100, dtype=np.float32)}
    m = sj.topk_mask(scores, 0.9)
    assert np.size(m["small"]) == 0
    m = sj.topk_mask(scores, 0.9, min_keep_per_tensor=0.05)
    assert sj.num_active(m) == 110 and np.size(m["small"]) == 5
    np.testing.assert_array_equal(m["small"], np.arange(95, 100))
    with pytest.raises(ValueError, match="reserves"):
        sj.topk_mask(scores, 0.99, min_keep_per_tensor=0.5)
    with pytest.raises(ValueError, match="NaN"):
        sj.topk_mask({"x": np.array([1.0, np.nan])}, 0.5)


def test_topk_handles_negative_and_signed_zero_scores():
    scores = {"x": np.array([-3.0, -0.0, 0.0, -1e-30, 2.0, -np.inf], np.float32)}
    m = sj.topk_mask(scores, 0.5)
    np.testing.assert_array_equal(m["x"], [1, 2, 4])  # 2.0, +0.0 and -0.0 (tie by order)


def test_diff_mask_tolerance_and_bf16():
    rng = np.random.default_rng(1)
    a = {"w": rng.normal(size=(20, 30)).astype(np.float32)}
    b = {"w": a["w"].copy()}
    changed = rng.choice(600, size=40, replace=False)
    flat = b["w"].reshape(-1)
    flat[changed] += rng.choice([-1, 1], size=40) * rng.uniform(1e-3, 1e-1, size=40)
    flat[rng.choice(np.setdiff1d(np.arange(600), changed), 10, replace=False)] += 1e-6
    m = sj.diff_mask(a, b, atol=1e-5)
    np.testing.assert_array_equal(m["w"], np.sort(changed))
    # A change below bf16's resolution vanishes when both sides are rounded to bf16.
    tiny = {"w": a["w"] * (1 + 2.0**-12)}
    assert sj.num_active(sj.diff_mask(a, tiny)) > 0
    assert sj.num_active(sj.diff_mask(a, tiny, dtype=jnp.bfloat16)) < 600 // 4
    with pytest.raises(ValueError, match="shapes differ"):
        sj.diff_mask(a, {"w": np.zeros((30, 20), np.float32)})


def test_dense_round_trip_and_density():
    params = shape_tree([(6, 7), (5,), ()])
    for strategy in ("per_tensor", "row_balanced", "global"):
        m = sj.random_mask(params, 0.4, seed=3, strategy=strategy)
        dense = sj.to_dense(m, params)
        back = sj.from_dense(dense)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(m)):
            np.testing.assert_array_equal(a, np.asarray(b).reshape(-1))
        d = sj.density(m, params)
        assert d.active == sum(int(x.sum()) for x in jax.tree.leaves(dense))
        assert d.total == 48 and d.density == d.active / 48


def test_save_load_round_trip(tmp_path):
    params = {"a": {"w": jnp.ones((9, 4))}, "b": [jnp.ones((3,)), jnp.ones(())]}
    m = sj.random_mask(params, 0.5, seed=2, strategy="row_balanced")
    path = str(tmp_path / "mask.safetensors")
    sj.save_mask(path, m, metadata={"sparsity": 0.5, "seed": 2})
    loaded, meta = sj.load_mask(path, like=params)
    assert meta == {"sparsity": "0.5", "seed": "2"}
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(m)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.int32 and a.shape == b.shape
    flat, _ = sj.load_mask(path)
    assert set(flat) == {"a/w", "b/0", "b/1"}
    with pytest.raises(ValueError, match="does not match"):
        sj.load_mask(path, like={"a": {"w": jnp.ones((9, 4))}})


@pytest.mark.parametrize("bad, message", [
    (lambda m: {**m, "w": m["w"].astype(np.int64)}, "int32"),
    (lambda m: {**m, "w": m["w"][::-1].copy()}, "not sorted"),
    (lambda m: {**m, "w": np.concatenate([m["w"][:1], m["w"]])}, "duplicate"),
    (lambda m: {**m, "w": np.append(m["w"], np.int32(10_000))}, "out of range"),
    (lambda m: {**m, "w": np.append(np.int32(-1), m["w"])}, "out of range"),
    (lambda m: {"w": m["w"]}, "tensors without a mask entry"),
    (lambda m: {**m, "w": m["w"].reshape(1, 1, -1)}, "rank"),
])
def test_validation_errors(bad, message):
    params = {"w": jnp.ones((20, 30)), "v": jnp.ones((7,))}
    m = sj.random_mask(params, 0.5)
    with pytest.raises(ValueError, match=message):
        sj.validate_mask(bad(m), params)


def test_row_balanced_validation_catches_wrong_rows():
    params = {"w": jnp.ones((2, 10))}
    # Sorted and unique overall, but 3 belongs to row 0, not row 1.
    with pytest.raises(ValueError, match="outside its row"):
        sj.validate_mask({"w": np.array([[1, 2], [3, 15]], np.int32)}, params)
    with pytest.raises(ValueError, match="rows"):
        sj.validate_mask({"w": np.array([[1, 2]], np.int32)}, params)
    sj.validate_mask({"w": np.array([[1, 2], [13, 15]], np.int32)}, params)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        sj.random_mask({"w": jnp.ones((3, 3))}, sparsity)


# ----------------------------------------------------------------------------- mask files


def _mask_file(tmp_path, metadata):
    from safetensors.numpy import save_file
    path = str(tmp_path / "m.safetensors")
    save_file({"w": np.arange(3, dtype=np.int32), "v": np.arange(2, dtype=np.int32)}, path,
              metadata=metadata)
    return path


@pytest.mark.parametrize("metadata,message", [
    ({"format": "sparsejax-mask-v1"}, "field paths is missing"),
    ({"format": "sparsejax-mask-v1", "paths": "[w"}, "field paths is not valid JSON"),
    ({"format": "sparsejax-mask-v1", "paths": '{"w": 1}'}, "must be a list"),
    ({"format": "sparsejax-mask-v1", "paths": '["w"]'}, r"does not list: \['v'\]"),
    ({"format": "sparsejax-mask-v1", "paths": '["w", "v", "u"]'}, r"does not hold: \['u'\]"),
    ({"format": "other"}, "not a sparsejax mask file"),
])
def test_load_mask_checks_its_metadata(tmp_path, metadata, message):
    from sparsejax import masks as masks_lib
    metadata = {k: v.replace("sparsejax-mask-v1", masks_lib.FORMAT) for k, v in metadata.items()}
    with pytest.raises(ValueError, match=message):
        masks_lib.load_mask(_mask_file(tmp_path, metadata))
