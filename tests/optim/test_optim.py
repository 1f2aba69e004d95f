"""Sparse AdamW vs the reference ``mask * optax.adamw(mask * g)``, state size, options."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax.optim.sparse import gather

STEPS = 50
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 3e-2, warmup_steps=5, decay_steps=STEPS)


def make_params(rng, dtype=jnp.float32):
    """A nested tree with a scalar, vectors, matrices and a 3-D tensor."""
    shape_tree = {
        "embed": (41, 16),
        "block": {"w": (16, 24), "b": (24,), "scale": (), "conv": (3, 5, 8)},
        "head": [(24, 7), (7,)],
    }
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), dtype), shape_tree,
                        is_leaf=lambda x: isinstance(x, tuple))


def random_grads(rng, params):
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


def rel_err(a, b):
    """Max over tensors of ``max|a - b| / max|b|`` (0 for identical trees)."""
    errs = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
                  / max(float(jnp.max(jnp.abs(y.astype(jnp.float32)))), 1e-30))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.size(y)]
    return max(errs)


def masked(tree, dense):
    return jax.tree.map(lambda x, d: x * d, tree, dense)


@pytest.mark.parametrize("strategy", ["per_tensor", "global", "row_balanced"])
def test_parity_with_masked_optax_adamw(strategy):
    rng = np.random.default_rng(17)
    params = make_params(rng)
    mask = sj.random_mask(params, 0.6, seed=int(rng.integers(1 << 30)), strategy=strategy)
    dense = sj.to_dense(mask, params)
    clip = optax.clip_by_global_norm(1.0)
    kw = dict(weight_decay=0.05)
    ref = optax.chain(clip, optax.adamw(SCHEDULE, **kw))
    tx = optax.chain(clip, sj.sparse_adamw(mask, SCHEDULE, **kw, backend="xla"))
    fused = sj.fused_sparse_adamw(mask, SCHEDULE, **kw, backend="xla")

    ref_p, tx_p = params, params
    fused_p = jax.tree.map(jnp.copy, params)  # the fused step donates its params
    ref_s, tx_s, fused_s = ref.init(params), tx.init(params), fused.init(params)
    moved = False
    for _ in range(STEPS):
        g = random_grads(rng, params)
        g_masked = masked(g, dense)
        u, ref_s = ref.update(g_masked, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, masked(u, dense))
        # The transform sees the raw gradient: what lies off the mask must not matter,
        # except through the clip, so both chains clip the masked gradient.
        u, tx_s = tx.update(g_masked, tx_s, tx_p)
        assert all(np.all(np.asarray(x)[~d] == 0) for x, d in
                   zip(jax.tree.leaves(u), jax.tree.leaves(dense)))
        tx_p = optax.apply_updates(tx_p, u)
        g_clipped, _ = clip.update(g_masked, clip.init(params))
        fused_p, fused_s, info = fused.step(fused_p, g_clipped, fused_s)
        assert not bool(info.skipped)
    moved = rel_err(ref_p, params) > 1e-2
    assert moved, "the reference barely moved; the comparison would be vacuous"
    assert rel_err(tx_p, ref_p) <= 1e-6
    assert rel_err(fused_p, ref_p) <= 1e-6
    assert int(fused_s.count) == int(tx_s[1].count) == STEPS
    # Off the mask nothing moved at all.
    for p0, p1, d in zip(jax.tree.leaves(params), jax.tree.leaves(fused_p),
                         jax.tree.leaves(dense)):
        np.testing.assert_array_equal(np.asarray(p1)[~d], np.asarray(p0)[~d])


def test_off_mask_gradient_is_ignored():
    rng = np.random.default_rng(3)
    params = make_params(rng)
    mask = sj.random_mask(params, 0.7, seed=5)
    dense = sj.to_dense(mask, params)
    tx = sj.sparse_adamw(mask, 1e-2)
    s_raw = s_masked = tx.init(params)
    for _ in range(3):
        g = random_grads(rng, params)
        u_raw, s_raw = tx.update(g, s_raw, params)
        u_masked, s_masked = tx.update(masked(g, dense), s_masked, params)
        assert rel_err(u_raw, u_masked) == 0.0


def test_full_mask_equals_optax_adamw():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    full = sj.random_mask(params, 0.0)
    assert sj.num_active(full) == sum(p.size for p in jax.tree.leaves(params))
    ref, tx = optax.adamw(SCHEDULE), sj.sparse_adamw(full, SCHEDULE)
    ref_p = tx_p = params
    ref_s, tx_s = ref.init(params), tx.init(params)
    for _ in range(20):
        g = random_grads(rng, params)
        u, ref_s = ref.update(g, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, u)
        u, tx_s = tx.update(g, tx_s, tx_p)
        tx_p = optax.apply_updates(tx_p, u)
    assert rel_err(tx_p, ref_p) <= 1e-6
    assert rel_err(tx_s.mu, jax.tree.map(lambda m, i: gather(m, jnp.asarray(i)),
                                         ref_s[0].mu, full)) <= 1e-6


def state_bytes(state):
    return sum(x.nbytes for x in jax.tree.leaves(state))


def test_state_holds_k_entries_and_is_small():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(300, 200)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=(1000,)), jnp.float32),
              "t": jnp.asarray(rng.normal(size=(4, 50, 60)), jnp.float32)}
    for strategy in ("per_tensor", "row_balanced"):
        mask = sj.random_mask(params, 0.99, strategy=strategy)
        state = sj.sparse_adamw(mask, 1e-3).init(params)
        for m, v, i in zip(jax.tree.leaves(state.mu), jax.tree.leaves(state.nu),
                           jax.tree.leaves(mask)):
            assert m.size == v.size == i.size
        dense_bytes = state_bytes(optax.adamw(1e-3).init(params))
        assert state_bytes(state) * 50 <= dense_bytes
        # Even counting the mask itself, still under 1/25.
        assert (state_bytes(state) + state_bytes(mask)) * 25 <= dense_bytes


def test_compressed_gradients_match_dense():
    rng = np.random.default_rng(4)
    params = make_params(rng)
    mask = sj.random_mask(params, 0.5, strategy="row_balanced", seed=2)
    fused = sj.fused_sparse_adamw(mask, 1e-2)
    p_dense, p_comp = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, params)
    s_dense, s_comp = fused.init(params), fused.init(params)
    for _ in range(4):
        g = random_grads(rng, params)
        g_comp = jax.tree.map(lambda x, i: gather(x, jnp.asarray(i)), g, mask)
        p_dense, s_dense, _ = fused.step(p_dense, g, s_dense)
        p_comp, s_comp, _ = fused.step(p_comp, g_comp, s_comp)
    # Two compiled programs may fuse differently: equal to float32 rounding.
    assert rel_err(p_comp, p_dense) <= 1e-6


def test_bf16_master_weights_keep_small_updates():
    rng = np.random.default_rng(5)
    params32 = {"w": jnp.asarray(rng.normal(size=(64, 32)) + 4.0, jnp.float32)}
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    mask = sj.random_mask(params32, 0.5, seed=1)
    lr = 1e-4  # an update far below bf16's resolution at |w| ~ 4 (spacing 2**-5)
    ref = sj.fused_sparse_adamw(mask, lr, weight_decay=0.0)
    with_master = sj.fused_sparse_adamw(mask, lr, weight_decay=0.0, master_weights=True)
    without = sj.fused_sparse_adamw(mask, lr, weight_decay=0.0)
    p_ref = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params32)
    p_m, p_n = jax.tree.map(jnp.copy, params16), jax.tree.map(jnp.copy, params16)
    s_ref, s_m, s_n = ref.init(p_ref), with_master.init(p_m), without.init(p_n)
    for _ in range(200):
        g = {"w": jnp.asarray(rng.normal(size=(64, 32)) + 1.0, jnp.float32)}
        p_ref, s_ref, _ = ref.step(p_ref, g, s_ref)
        p_m, s_m, _ = with_master.step(p_m, g.copy(), s_m)
        p_n, s_n, _ = without.step(p_n, g.copy(), s_n)
    idx = jnp.asarray(mask["w"])
    # The f32 master follows the f32 run; the bf16 params are its rounding.
    assert rel_err(s_m.master, {"w": gather(p_ref["w"], idx)}) <= 1e-6
    np.testing.assert_array_equal(np.asarray(p_m["w"]),
                                  np.asarray(jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                          p_ref)["w"]))
    # Without a master copy the bf16 params never move: each update rounds away.
    moved_without = float(jnp.max(jnp.abs(p_n["w"].astype(jnp.float32)
                                          - params16["w"].astype(jnp.float32))))
    moved_with = float(jnp.max(jnp.abs(p_m["w"].astype(jnp.float32)
                                       - params16["w"].astype(jnp.float32))))
    assert moved_without == 0.0 and moved_with > 0.0


@pytest.mark.parametrize("path", ["transform", "fused"])
def test_nonfinite_gradients_skip_the_step(path):
    rng = np.random.default_rng(6)
    params = make_params(rng)
    mask = sj.random_mask(params, 0.5, seed=3)
    kw = dict(learning_rate=1e-2, skip_nonfinite=True)
    opt = sj.sparse_adamw(mask, **kw) if path == "transform" else sj.fused_sparse_adamw(mask, **kw)
    state = opt.init(params)
    p = jax.tree.map(jnp.copy, params)

    def step(p, g, state):
        if path == "transform":
            u, state = opt.update(g, state, p)
            return optax.apply_updates(p, u), state
        p, state, _ = opt.step(p, g, state)
        return p, state

    p, state = step(p, random_grads(rng, params), state)
    before_p, before_s = jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, state)
    bad = random_grads(rng, params)
    i = int(np.asarray(mask["block"]["w"]).reshape(-1)[0])
    bad["block"]["w"] = bad["block"]["w"].reshape(-1).at[i].set(jnp.nan).reshape(16, 24)
    p, state = step(p, bad, state)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(before_p)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert int(state.count) == int(before_s.count) == 1
    assert int(state.skipped) == 1
    for a, b in zip(jax.tree.leaves((state.mu, state.nu)),
                    jax.tree.leaves((before_s.mu, before_s.nu))):
        np.testing.assert_array_equal(np.asarray(a), b)
    # A NaN off the mask does not count: the step goes ahead.
    off = random_grads(rng, params)
    dense = sj.to_dense(mask, params)
    j = int(np.flatnonzero(~dense["block"]["w"].reshape(-1))[0])
    off["block"]["w"] = off["block"]["w"].reshape(-1).at[j].set(jnp.inf).reshape(16, 24)
    p, state = step(p, off, state)
    assert int(state.count) == 2 and int(state.skipped) == 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


def test_inject_hyperparams_changes_learning_rate_without_retrace():
    rng = np.random.default_rng(7)
    params = make_params(rng)
    mask = sj.random_mask(params, 0.5, seed=4)
    dense = sj.to_dense(mask, params)
    tx = optax.inject_hyperparams(sj.sparse_adamw)(mask=mask, learning_rate=1e-2)
    ref = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2)
    s, rs = tx.init(params), ref.init(params)
    p = rp = params
    traces = []

    @jax.jit
    def update(g, s, p):
        traces.append(1)
        return tx.update(g, s, p)

    for lr in (1e-2, 3e-3, 1e-3):
        s.hyperparams["learning_rate"] = jnp.asarray(lr)
        rs.hyperparams["learning_rate"] = jnp.asarray(lr)
        g = masked(random_grads(rng, params), dense)
        u, s = update(g, s, p)
        p = optax.apply_updates(p, u)
        u, rs = ref.update(g, rs, rp)
        rp = optax.apply_updates(rp, masked(u, dense))
    assert len(traces) == 1
    assert rel_err(p, rp) <= 1e-6


def test_orbax_round_trip_continues_identically(tmp_path):
    from sparsejax.runs import checkpoint
    rng = np.random.default_rng(8)
    params = make_params(rng)
    # The scalar gets no entry in a row-balanced half mask: empty leaves must round-trip.
    mask = sj.random_mask(params, 0.5, seed=6, strategy="row_balanced")
    assert np.size(mask["block"]["scale"]) == 0
    fused = sj.fused_sparse_adamw(mask, SCHEDULE, master_weights=True)
    p, s = jax.tree.map(jnp.copy, params), fused.init(params)
    grads = [random_grads(rng, params) for _ in range(6)]
    for g in grads[:3]:
        p, s, _ = fused.step(p, g, s)
    tree = {"params": p, "opt": s, "mask": jax.tree.map(jnp.asarray, mask)}
    checkpoint.save(tmp_path / "ckpt", tree)
    restored = checkpoint.restore(tmp_path / "ckpt", tree)
    mask2 = jax.tree.map(np.asarray, restored["mask"])
    for a, b in zip(jax.tree.leaves(mask2), jax.tree.leaves(mask)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype and a.shape == b.shape
    fused2 = sj.fused_sparse_adamw(mask2, SCHEDULE, master_weights=True)
    p2, s2 = restored["params"], restored["opt"]
    assert isinstance(s2, sj.SparseAdamWState)
    for g in grads[3:]:
        p, s, _ = fused.step(p, g, s)
        p2, s2, _ = fused2.step(p2, g, s2)
    assert rel_err(p2, p) == 0.0
    assert rel_err(s2.mu, s.mu) == 0.0 and int(s2.count) == int(s.count) == 6


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(9)
    params = make_params(rng)
    mask = sj.random_mask(params, 0.5)
    with pytest.raises(ValueError, match="int32"):
        sj.sparse_adamw(jax.tree.map(lambda i: i.astype(np.int64), mask), 1e-3)
    with pytest.raises(ValueError, match="unknown backend"):
        sj.fused_sparse_adamw(mask, 1e-3, backend="cuda")
    with pytest.raises(ValueError, match="structure"):
        sj.sparse_adamw({"embed": mask["embed"]}, 1e-3).init(params)
    fused = sj.fused_sparse_adamw(mask, 1e-3)
    bad = random_grads(rng, params)
    bad["embed"] = bad["embed"][:3]
    with pytest.raises(ValueError, match="fits neither"):
        fused.update(params, bad, fused.init(params))


@pytest.mark.parametrize("strategy", ["per_tensor", "row_balanced"])
def test_backends_agree_through_the_optimizer(strategy):
    """The fused step via the interpreted Pallas kernel (one launch per tensor, or several
    tensors per launch) equals the xla backend."""
    rng = np.random.default_rng(10)
    params = make_params(rng)
    mask = sj.random_mask(params, 0.5, seed=7, strategy=strategy)
    results = {}
    for name, backend, per_launch in (("xla", "xla", 1), ("interpret", "interpret", 1),
                                      ("batched", "interpret", 3)):
        fused = sj.fused_sparse_adamw(mask, SCHEDULE, weight_decay=0.1, backend=backend,
                                      master_weights=True, tensors_per_launch=per_launch)
        p, s = jax.tree.map(jnp.copy, params), fused.init(params)
        step_rng = np.random.default_rng(11)
        for _ in range(5):
            p, s, _ = fused.step(p, random_grads(step_rng, params), s)
        results[name] = (p, s)
    for name in ("interpret", "batched"):
        assert rel_err(results[name][0], results["xla"][0]) <= 1e-6
        assert rel_err(results[name][1].nu, results["xla"][1].nu) <= 1e-6
        assert rel_err(results[name][1].master, results["xla"][1].master) <= 1e-6
    assert rel_err(results["xla"][0], params) > 1e-3


def test_auto_backend_is_xla_without_a_gpu():
    from sparsejax import backends
    expected = "pallas" if backends.on_nvidia_gpu() else "xla"
    assert backends.resolve_backend("auto") == expected
