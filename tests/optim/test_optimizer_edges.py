"""The optimizers at their edges: bad masks and gradients refused, skipped steps that
are no-ops to the bit, and full finetuning of bf16 params that keeps its updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
import sparsejax.optim.sparse as sparse_opt
from sparsejax.losses import grpo_loss
from sparsejax.optim.dense import dense_adamw


def _params(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(16, 12)), dtype),
            "b": jnp.asarray(rng.normal(size=(12,)), dtype)}


def _bits(x):
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


# ----------------------------------------------------------------------------- masks


def _bad_masks(params):
    good = sj.random_mask(params, 0.5, seed=1)
    w = np.asarray(good["w"])
    rows = sj.random_mask(params, 0.5, seed=1, strategy="row_balanced")
    return {
        "negative": {**good, "w": np.concatenate([[-1], w[1:]]).astype(np.int32)},
        "out of range": {**good, "w": np.concatenate([w[:-1], [16 * 12]]).astype(np.int32)},
        "duplicate": {**good, "w": np.sort(np.concatenate([w[:-1], w[:1]])).astype(np.int32)},
        "not sorted": {**good, "w": w[::-1].copy()},
        "rows": {**rows, "w": np.asarray(rows["w"])[:-1]},
    }


@pytest.mark.parametrize("case", ["negative", "out of range", "duplicate", "not sorted", "rows"])
@pytest.mark.parametrize("which", ["transform", "fused"])
def test_optimizers_refuse_bad_masks_at_init(case, which):
    params = _params()
    mask = _bad_masks(params)[case]
    with pytest.raises(ValueError) as err:
        sj.validate_mask(mask, params)
    expected = str(err.value)
    opt = (sj.sparse_adamw(mask, 1e-2) if which == "transform"
           else sj.fused_sparse_adamw(mask, 1e-2))
    with pytest.raises(ValueError) as err:
        opt.init(params)
    assert str(err.value) == expected


def test_transform_refuses_wrong_gradient_shapes():
    params = _params()
    mask = sj.random_mask(params, 0.5, seed=0)
    tx = sj.sparse_adamw(mask, 1e-2)
    state = tx.init(params)
    grads = {"w": jnp.ones((1, 12)), "b": jnp.ones((12,))}  # broadcastable, wrong
    with pytest.raises(ValueError, match="w"):
        tx.update(grads, state, params)
    fused = sj.fused_sparse_adamw(mask, 1e-2)
    with pytest.raises(ValueError, match="gradient for .*w"):
        fused.update(params, grads, fused.init(params))


# ----------------------------------------------------------------------------- skipped steps


def _special_params(dtype):
    """Params full of subnormals, signed zeros and ordinary values."""
    rng = np.random.default_rng(3)
    tiny = np.finfo(np.float32).tiny if dtype == jnp.float32 else 1.1754944e-38
    w = rng.normal(size=(16, 12)).astype(np.float32)
    w.reshape(-1)[::3] = tiny * rng.uniform(0.01, 0.9, size=w.size)[::3]  # subnormal
    w.reshape(-1)[1::7] = -0.0
    w.reshape(-1)[2::7] = 0.0
    b = rng.normal(size=(12,)).astype(np.float32)
    b[::2] = -0.0
    return {"w": jnp.asarray(w, dtype), "b": jnp.asarray(b, dtype)}


def _subnormal(x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return (x != 0) & (np.abs(x) < np.finfo(np.float32).tiny)


@pytest.mark.parametrize("dtype,master,strategy,mu_dtype", [
    (jnp.float32, False, "per_tensor", None), (jnp.float32, True, "per_tensor", None),
    (jnp.bfloat16, False, "per_tensor", None), (jnp.bfloat16, True, "per_tensor", None),
    (jnp.bfloat16, True, "row_balanced", None), (jnp.bfloat16, False, "per_tensor", "bfloat16")])
def test_skipped_fused_step_is_bit_exact_noop(dtype, master, strategy, mu_dtype):
    params = _special_params(dtype)
    assert (np.asarray(params["w"], np.float32) != 0).any()
    mask = sj.random_mask(params, 0.3, seed=2, strategy=strategy)
    opt = sj.fused_sparse_adamw(mask, 1e-2, weight_decay=0.1, master_weights=master,
                                skip_nonfinite=True, mu_dtype=mu_dtype)
    state = opt.init(params)
    rng = np.random.default_rng(4)
    good = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    # One real step first so that the moments are not zeros.
    params, state, info = opt.step(params, good, state)
    assert not bool(info.skipped)
    before = jax.tree.map(np.array, (params, state))  # copies: the step donates its inputs
    first_active = int(np.asarray(mask["b"]).reshape(-1)[0])  # a NaN off the mask would not count
    bad = {**good, "b": good["b"].at[first_active].set(jnp.nan)}
    params, state, info = opt.step(params, bad, state)
    assert bool(info.skipped) and int(state.skipped) == 1 and info.grad_norm is None
    for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    for name in ("count", "mu", "nu", "master", "indices"):
        for a, b in zip(jax.tree.leaves(getattr(before[1], name)),
                        jax.tree.leaves(getattr(state, name))):
            np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8),
                                          np.atleast_1d(b).view(np.uint8))


def test_skipped_transform_step_gives_exact_zero_updates_and_same_state():
    params = _special_params(jnp.float32)
    mask = sj.random_mask(params, 0.3, seed=2)
    tx = sj.sparse_adamw(mask, 1e-2, skip_nonfinite=True)
    state = tx.init(params)
    g = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
    _, state = tx.update(g, state, params)
    bad = {**g, "w": g["w"].at[0, 0].set(jnp.inf)}
    updates, new_state = tx.update(bad, state, params)
    for u in jax.tree.leaves(updates):  # -0.0 only: x + -0.0 is x for every x
        np.testing.assert_array_equal(_bits(u), np.full(u.shape, 0x80000000, np.uint32))
    applied = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(applied)):
        assert (np.signbit(np.asarray(a)) & (np.asarray(a) == 0)).any()  # -0.0 params kept
        normal = ~_subnormal(a)  # XLA's CPU add flushes subnormals to zero, whatever we add
        np.testing.assert_array_equal(_bits(a)[normal], _bits(b)[normal])
    assert int(new_state.skipped) == 1 and int(new_state.count) == int(state.count)
    for a, b in zip(jax.tree.leaves((state.mu, state.nu)),
                    jax.tree.leaves((new_state.mu, new_state.nu))):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_transform_leaves_off_mask_params_bit_for_bit():
    """A taken step moves the active entries; every other param, -0.0 included, stays."""
    params = _special_params(jnp.float32)
    mask = sj.random_mask(params, 0.5, seed=5)
    tx = sj.sparse_adamw(mask, 1e-2, weight_decay=0.1)
    rng = np.random.default_rng(6)
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    updates, _ = tx.update(g, tx.init(params), params)
    applied = optax.apply_updates(params, updates)
    for p, a, m in zip(jax.tree.leaves(params), jax.tree.leaves(applied),
                       jax.tree.leaves(sj.to_dense(mask, params))):
        off = ~np.asarray(m, bool) & ~_subnormal(p)  # XLA's CPU add flushes subnormals
        assert (np.signbit(np.asarray(p)) & (np.asarray(p) == 0) & off).any()
        np.testing.assert_array_equal(_bits(p)[off], _bits(a)[off])
        on = np.asarray(m, bool)
        assert (_bits(p)[on] != _bits(a)[on]).any()


@pytest.mark.parametrize("dtype,master", [(jnp.bfloat16, None), (jnp.float32, None),
                                          (jnp.bfloat16, False)])  # the last: lax.cond
def test_skipped_dense_step_is_bit_exact_noop(dtype, master):
    params = _special_params(dtype)
    opt = dense_adamw(optax.linear_schedule(1e-3, 1e-4, 10), weight_decay=0.1,
                      master_weights=master, skip_nonfinite=True)
    state = opt.init(params)
    g = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.float32), params)
    params, state, _ = opt.step(params, g, state)
    before = jax.tree.map(np.array, (params, state))  # copies: the step donates its inputs
    params, state, info = opt.step(params, {**g, "b": g["b"].at[0].set(jnp.nan)}, state)
    assert bool(info.skipped) and int(state.skipped) == 1
    state = state._replace(skipped=jnp.zeros([], jnp.int32))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((params, state))):
        np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8),
                                      np.atleast_1d(b).view(np.uint8))


def _pointers(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("which", ["fused", "fused, large-tensor fallback", "dense"])
def test_guarded_step_is_the_unguarded_step_in_place(which, monkeypatch):
    """On finite gradients the guarded step gives the unguarded step's bits; guarded
    steps (taken or skipped) write the donated params in place (no cond copies)."""
    if which == "fused, large-tensor fallback":  # as if every tensor were too large to shift
        monkeypatch.setattr(sparse_opt, "_MAX_SHIFTED_SIZE", 0)
    params = _special_params(jnp.bfloat16)
    rng = np.random.default_rng(11)
    if which == "dense":
        make = lambda skip: dense_adamw(1e-2, weight_decay=0.1, skip_nonfinite=skip,
                                        max_grad_norm=1.0)
    else:
        mask = sj.random_mask(params, 0.4, seed=3)
        make = lambda skip: sj.fused_sparse_adamw(mask, 1e-2, weight_decay=0.1,
                                                  master_weights=True, skip_nonfinite=skip,
                                                  max_grad_norm=1.0)
    plain, guarded = make(False), make(True)
    p1, s1 = jax.tree.map(jnp.copy, params), plain.init(params)
    p2, s2 = jax.tree.map(jnp.copy, params), guarded.init(params)
    for step in range(3):
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        if step == 1:  # a skipped step in the guarded run only
            before = jax.tree.map(np.array, p2)
            where = _pointers(p2)
            p2, s2, info = guarded.step(p2, {**g, "w": g["w"].at[:, :].set(jnp.inf)}, s2)
            assert bool(info.skipped) and _pointers(p2) == where
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(p2)):
                np.testing.assert_array_equal(_bits(a), _bits(b))
        p1, s1, _ = plain.step(p1, g, s1)
        where = _pointers(p2)
        p2, s2, info = guarded.step(p2, g, s2)
        assert not bool(info.skipped) and _pointers(p2) == where
    s2 = s2._replace(skipped=jnp.zeros([], jnp.int32))
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8),
                                      np.atleast_1d(np.asarray(b)).view(np.uint8))


# ----------------------------------------------------------------------------- clipping


def test_fused_clipping_matches_optax_chain():
    params = _params(5)
    mask = sj.random_mask(params, 0.6, seed=5)
    rng = np.random.default_rng(6)
    grads = [jax.tree.map(lambda p: jnp.asarray(3 * rng.normal(size=p.shape), jnp.float32),
                          params) for _ in range(4)]
    ref_tx = optax.chain(optax.clip_by_global_norm(0.7), sj.sparse_adamw(mask, 1e-2))
    fused = sj.fused_sparse_adamw(mask, 1e-2, max_grad_norm=0.7)
    dense_mask = sj.to_dense(mask, params)
    p_ref, s_ref = params, ref_tx.init(params)
    p_f, s_f = jax.tree.map(jnp.copy, params), fused.init(params)
    for g in grads:
        masked = jax.tree.map(lambda x, m: x * m, g, dense_mask)  # the norm of mask * g
        u, s_ref = ref_tx.update(masked, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        p_f, s_f, info = fused.step(p_f, g, s_f)
        np.testing.assert_allclose(float(info.grad_norm), float(optax.global_norm(masked)),
                                   rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_f)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- bf16 full FT


def test_bf16_full_finetuning_keeps_updates_of_float32_run():
    """At LR 1e-6 a bf16 run with master weights changes what the float32 run changes
    (compared in bf16); stepping the bf16 params directly loses almost all of it."""
    rng = np.random.default_rng(7)
    # Weights of a pretrained LLM's scale (std 0.02): 100 steps of 1e-6 move them by
    # about one bf16 ulp, a single step by far less than half of one.
    base = {"w": jnp.asarray(0.02 * rng.normal(size=(64, 48)), jnp.bfloat16),
            "v": jnp.asarray(0.02 * rng.normal(size=(48,)), jnp.bfloat16)}
    grad = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), base)
    steps, lr = 100, 1e-6

    def run(opt, params):
        state = opt.init(params)
        for _ in range(steps):
            params, state, _ = opt.step(params, grad, state)
        return params

    f32 = run(dense_adamw(lr, weight_decay=0.0),
              jax.tree.map(lambda p: p.astype(jnp.float32), base))
    bf16 = run(dense_adamw(lr, weight_decay=0.0), jax.tree.map(jnp.copy, base))
    for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16)):
        np.testing.assert_array_equal(_bits(a.astype(jnp.bfloat16)), _bits(b))
    changed = np.mean(np.concatenate([
        (np.asarray(a) != np.asarray(b)).reshape(-1)
        for a, b in zip(jax.tree.leaves(bf16), jax.tree.leaves(base))]))
    assert changed > 0.5, changed
    # The control: optax.adamw on the bf16 params themselves (bf16 moments) drops them.
    tx = optax.adamw(lr, weight_decay=0.0)
    params, state = jax.tree.map(jnp.copy, base), tx.init(base)
    step = jax.jit(lambda p, s: (lambda u, s2: (optax.apply_updates(p, u), s2))(
        *tx.update(jax.tree.map(lambda g, x: g.astype(x.dtype), grad, p), s, p)))
    for _ in range(steps):
        params, state = step(params, state)
    lost = np.mean(np.concatenate([
        (np.asarray(a) != np.asarray(b)).reshape(-1)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base))]))
    assert lost < changed / 5, (lost, changed)


def test_dense_adamw_without_master_is_optax_adamw():
    params = _params(8)
    rng = np.random.default_rng(9)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                          params) for _ in range(3)]
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt = dense_adamw(1e-2, weight_decay=0.1)
    p_ref, s_ref = params, tx.init(params)
    p, s = jax.tree.map(jnp.copy, params), opt.init(params)
    assert s.master is None
    for g in grads:
        u, s_ref = tx.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        p, s, _ = opt.step(p, g, s)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["epsilon", "epsilon_high", "beta"])
@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf")])
def test_grpo_loss_refuses_bad_clip_and_kl_coefficients(name, value):
    rng = np.random.default_rng(10)
    logps = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    mask = jnp.ones((4, 5), jnp.float32)
    kwargs = {name: value}
    if name == "beta":
        kwargs["ref_logps"] = logps
    with pytest.raises(ValueError, match=name):
        grpo_loss(logps, None, jnp.ones(4), mask, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(learning_rate=float("nan")),
                                    dict(learning_rate=float("inf")), dict(warmup_steps=-5),
                                    dict(max_grad_norm=float("nan")), dict(b2=1.0)])
def test_sparse_config_refuses_non_finite_and_out_of_range(kwargs):
    from sparsejax.config import TrainableConfig
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        TrainableConfig(**kwargs)
