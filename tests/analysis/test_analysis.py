"""Tests for sparsejax.analysis: update sparsity, update rank, overlap, streaming scorers.

Checkpoints are tiny ``transformers`` Qwen2 models whose weights are first rounded to
bf16-representable values, so every planted change has a known fate under both the
bf16 and the float32 rule of Mukherjee et al. (arXiv 2505.11711).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import sparsejax
from sparsejax.analysis import (
    AnalysisError,
    MagnitudeScorer,
    MomentumScorer,
    VarianceScorer,
    diff_checkpoints,
    layer_group,
    load_checkpoint,
    mask_overlap,
    matrix_type,
    save_diff_mask,
    score_trajectory,
    update_rank,
    update_rank_fraction,
)

Q0 = "model.layers.0.self_attn.q_proj.weight"
LN0 = "model.layers.0.input_layernorm.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
Q1 = "model.layers.1.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"

# Changed entries per tensor under each rule, for checkpoint B vs A (see `ckpts`).
CHANGED_BF16 = {Q0: [0, 3], DOWN1: [10, 20, 30], EMBED: list(range(80, 96)), NORM: [0]}
CHANGED_F32 = {Q0: [0, 1, 3], DOWN1: [10, 20, 30], EMBED: list(range(80, 96)), NORM: [0],
               LN0: [3]}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsejax.analysis", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Folders: a (f32), b (f32, sharded, planted changes), b2 (another finetune),
    c (a in bf16), lowrank (a + a rank-2 update of one matrix)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("ckpts")
    cfg = transformers.Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).float()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.copy_(p.bfloat16().float())  # every base value is exactly representable in bf16
        q0 = params[Q0].view(-1)
        q0[:5] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.25])
        params[LN0].fill_(1.0)
        params[NORM].fill_(1.0)
    model.save_pretrained(root / "a")
    model.to(torch.bfloat16).save_pretrained(root / "c")
    model.float()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        q0 = params[Q0].view(-1)
        q0[0] = 0.75            # far above atol: changed under both rules
        q0[1] = 0.5 + 3e-5      # above atol in f32, below bf16 resolution at 0.5
        q0[2] = 5e-6            # below atol under both rules
        q0[3] = 2e-5            # above atol under both rules (bf16 keeps small numbers)
        q0[4] = 0.25 + 1e-6     # below atol under both rules
        params[DOWN1].view(-1)[[10, 20, 30]] += 1.0
        params[EMBED][5] += 0.5  # one row: flat 80..95
        params[NORM][0] = 1.0 + 2.0 ** -7  # the next bf16 value after 1
        params[LN0][3] = 1.0 + 1e-3  # bf16 rounds back to 1.0; f32 sees 1e-3
    model.save_pretrained(root / "b", max_shard_size="4KB")

    model.load_state_dict(base)
    with torch.no_grad():
        params[Q0].view(-1)[[0, 7]] += 1.0
        params[DOWN1].view(-1)[[20, 40]] += 1.0
    model.save_pretrained(root / "b2")

    model.load_state_dict(base)
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(16, 2, generator=gen), torch.randn(2, 16, generator=gen)
    with torch.no_grad():
        params[Q1] += u @ v
    model.save_pretrained(root / "lowrank")
    numels = {k: int(v.numel()) for k, v in base.items()}
    return {"root": root, "numels": numels,
            **{k: str(root / k) for k in ("a", "b", "b2", "c", "lowrank")}}


# ----------------------------------------------------------------------------- diff


def test_sharded_checkpoint_was_written(ckpts):
    files = os.listdir(ckpts["b"])
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1


@pytest.mark.parametrize("dtype,expected", [("bfloat16", CHANGED_BF16), ("float32", CHANGED_F32)])
def test_diff_counts_are_exact(ckpts, dtype, expected):
    report = diff_checkpoints(ckpts["a"], ckpts["b"], dtype=dtype, collect_mask=True)
    numels = ckpts["numels"]
    assert report.numel == sum(numels.values())
    per = {t.name: t for t in report.tensors}
    assert set(per) == set(numels)
    for name, t in per.items():
        assert t.numel == numels[name]
        assert t.changed == len(expected.get(name, [])), name
        np.testing.assert_array_equal(report.mask[name], expected.get(name, []))
        assert report.mask[name].dtype == np.int32
    n_changed = sum(len(v) for v in expected.values())
    assert report.unchanged == report.numel - n_changed
    assert report.sparsity == (report.numel - n_changed) / report.numel

    layers = {g.name: g for g in report.by_layer()}
    assert [g.name for g in report.by_layer()] == ["embeddings", "layers.0", "layers.1",
                                                   "final_norm", "lm_head"]
    changed_layer = {"embeddings": len(expected[EMBED]), "final_norm": 1, "lm_head": 0,
                     "layers.0": len(expected[Q0]) + len(expected.get(LN0, [])),
                     "layers.1": len(expected[DOWN1])}
    for name, n in changed_layer.items():
        g = layers[name]
        assert g.numel - g.unchanged == n, name
        assert g.numel == sum(v for k, v in numels.items() if layer_group(k) == name)
    types = {g.name: g for g in report.by_type()}
    assert types["q_proj"].numel - types["q_proj"].unchanged == len(expected[Q0])
    assert types["q_proj"].tensors == 2
    assert types["down_proj"].numel - types["down_proj"].unchanged == 3
    assert types["input_layernorm"].numel - types["input_layernorm"].unchanged == \
        len(expected.get(LN0, []))
    assert types["k_proj"].unchanged == types["k_proj"].numel
    assert sum(g.numel for g in types.values()) == report.numel


def test_diff_is_chunk_invariant_and_bf16_copy_is_identical(ckpts):
    full = diff_checkpoints(ckpts["a"], ckpts["b"], collect_mask=True)
    chunked = diff_checkpoints(ckpts["a"], ckpts["b"], collect_mask=True, max_chunk_elements=40)
    for name in full.mask:
        np.testing.assert_array_equal(full.mask[name], chunked.mask[name])
    for dtype in ("bfloat16", "float32"):  # c holds a's (bf16-exact) values stored as bf16
        assert diff_checkpoints(ckpts["a"], ckpts["c"], dtype=dtype).sparsity == 1.0


def test_names_to_groups():
    assert layer_group("model.layers.12.mlp.up_proj.weight") == "layers.12"
    assert layer_group(EMBED) == "embeddings"
    assert layer_group(NORM) == "final_norm"
    assert layer_group("lm_head.weight") == "lm_head"
    assert matrix_type("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert matrix_type("model.layers.3.self_attn.q_proj.bias") == "q_proj.bias"
    assert matrix_type("model.layers.3.input_layernorm.weight") == "input_layernorm"


def test_diff_errors(ckpts, tmp_path):
    with pytest.raises(AnalysisError, match="not found"):
        diff_checkpoints(tmp_path / "missing", ckpts["a"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="no model.safetensors"):
        diff_checkpoints(tmp_path / "empty", ckpts["a"])
    tensors = load_checkpoint(ckpts["a"])
    dropped = dict(tensors)
    del dropped[NORM]
    (tmp_path / "dropped").mkdir()
    save_file(dropped, str(tmp_path / "dropped" / "model.safetensors"))
    with pytest.raises(AnalysisError, match=r"different tensors.*model\.norm\.weight"):
        diff_checkpoints(ckpts["a"], tmp_path / "dropped")
    reshaped = dict(tensors)
    reshaped[Q0] = np.zeros((8, 32), np.float32)
    (tmp_path / "reshaped").mkdir()
    save_file(reshaped, str(tmp_path / "reshaped" / "model.safetensors"))
    with pytest.raises(AnalysisError, match="shape mismatch for " + Q0.replace(".", r"\.")):
        diff_checkpoints(ckpts["a"], tmp_path / "reshaped")


# ----------------------------------------------------------------------------- rank


def test_update_rank_of_known_low_rank_products():
    rng = np.random.default_rng(0)
    for r in (0, 1, 3, 7):
        delta = rng.standard_normal((40, r)) @ rng.standard_normal((r, 24))
        assert update_rank(delta) == r
        assert update_rank_fraction(delta) == r / 24
    assert update_rank(rng.standard_normal((10, 30))) == 10
    # A tiny third direction counts only below its relative size.
    delta = rng.standard_normal((20, 2)) @ rng.standard_normal((2, 20))
    delta += 1e-3 * np.linalg.norm(delta, 2) * np.outer(np.eye(20)[0], np.eye(20)[1])
    assert update_rank(delta, rtol=1e-2) == 2
    assert update_rank(delta, rtol=1e-5) == 3
    with pytest.raises(ValueError):
        update_rank(np.zeros(5))


def test_diff_rank(ckpts):
    report = diff_checkpoints(ckpts["a"], ckpts["lowrank"], dtype="float32", rank=True)
    per = {t.name: t for t in report.tensors}
    assert per[Q1].rank == 2 and per[Q1].rank_fraction == 2 / 16
    assert per[Q1].changed == 256
    assert per[EMBED].rank == 0 and per[NORM].rank is None
    n_matrices = sum(len(t.shape) == 2 for t in report.tensors)
    assert report.mean_rank_fraction == pytest.approx((2 / 16) / n_matrices)
    assert {g.name: g for g in report.by_type()}["q_proj"].mean_rank_fraction == \
        pytest.approx(1 / 16)


# ----------------------------------------------------------------------------- CLI


def test_cli_diff_json_mask_and_overlap(ckpts, tmp_path):
    m1, m2 = str(tmp_path / "m1.safetensors"), str(tmp_path / "m2.safetensors")
    out = _run_cli("diff", ckpts["a"], ckpts["b"], "--json", str(tmp_path / "r.json"),
                   "--save-mask", m1, "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "update sparsity" in out.stdout and "layers.1" in out.stdout
    assert "q_proj" in out.stdout and "down_proj" in out.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    total = sum(ckpts["numels"].values())
    assert data["total"]["params"] == total
    assert data["total"]["changed"] == sum(len(v) for v in CHANGED_BF16.values())
    mask, meta = sparsejax.load_mask(m1)
    assert int(meta["total"]) == total
    np.testing.assert_array_equal(mask[Q0], CHANGED_BF16[Q0])

    a = diff_checkpoints(ckpts["a"], ckpts["b2"], collect_mask=True)
    save_diff_mask(m2, a)
    out = _run_cli("overlap", m1, m2, "--json", str(tmp_path / "o.json"))
    assert out.returncode == 0, out.stderr
    o = json.loads((tmp_path / "o.json").read_text())
    # m1: 22 changed entries, m2: 4 (q0 {0, 7}, down1 {20, 40}); shared: q0[0], down1[20].
    assert (o["active1"], o["active2"], o["intersection"], o["total"]) == (22, 4, 2, total)
    assert o["jaccard"] == pytest.approx(2 / 24)
    assert (o["o1"], o["o2"]) == pytest.approx((2 / 22, 2 / 4))
    p, q = 22 / total, 4 / total
    assert o["baseline"] == pytest.approx({"o1": q, "o2": p, "jaccard": p * q / (p + q - p * q)})


def test_cli_bad_input_exits_2_with_one_line(ckpts, tmp_path):
    out = _run_cli("diff", str(tmp_path / "nope"), ckpts["a"])
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "not found" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run_cli("overlap", str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors"))
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    for sub in ("diff", "overlap"):
        out = _run_cli(sub, "--help")
        assert out.returncode == 0 and "usage:" in out.stdout


# ----------------------------------------------------------------------------- overlap


def _two_masks(tmp_path, meta1, meta2):
    m1 = {"a": np.array([0, 1, 2, 3], np.int32), "b": np.array([0, 1], np.int32)}
    m2 = {"a": np.array([2, 3, 4], np.int32), "b": np.array([1, 5, 6], np.int32)}
    p1, p2 = str(tmp_path / "1.safetensors"), str(tmp_path / "2.safetensors")
    sparsejax.save_mask(p1, m1, metadata=meta1)
    sparsejax.save_mask(p2, m2, metadata=meta2)
    return p1, p2


def test_overlap_hand_computed(tmp_path):
    p1, p2 = _two_masks(tmp_path, {"total": 100}, None)
    r = mask_overlap(p1, p2)
    assert (r.total, r.active1, r.active2, r.intersection) == (100, 6, 6, 3)
    assert r.jaccard == pytest.approx(3 / 9)
    assert (r.o1, r.o2) == pytest.approx((0.5, 0.5))
    assert r.baseline == pytest.approx({"o1": 0.06, "o2": 0.06,
                                        "jaccard": 0.0036 / (0.12 - 0.0036)})
    assert "jaccard" in r.format()
    with pytest.raises(AnalysisError, match="disagrees"):
        mask_overlap(p1, p2, total=50)

    q1, q2 = _two_masks(tmp_path, None, None)
    with pytest.raises(AnalysisError, match="--total"):
        mask_overlap(q1, q2)
    assert mask_overlap(q1, q2, total=100).baseline["o1"] == pytest.approx(0.06)
    with pytest.raises(AnalysisError, match="smaller"):
        mask_overlap(q1, q2, total=5)
    r1, r2 = _two_masks(tmp_path, {"total": 100}, {"total": 200})
    with pytest.raises(AnalysisError, match="disagree"):
        mask_overlap(r1, r2)


# ----------------------------------------------------------------------------- scorers


def _trajectory(steps: int = 25, seed: int = 0):
    """Checkpoints where w["a"][0] drifts steadily (+0.02 per step, small noise) and
    every other entry takes zero-mean noise steps of size 0.01."""
    rng = np.random.default_rng(seed)
    w = {"a": rng.standard_normal((10, 10)).astype(np.float32) + 1.0,
         "b": rng.standard_normal(5).astype(np.float32)}
    out = [w]
    for _ in range(steps):
        da = 0.01 * rng.standard_normal((10, 10))
        da[0] = 0.02 + 1e-3 * rng.standard_normal(10)
        w = {"a": (w["a"] + da).astype(np.float32),
             "b": (w["b"] + 0.01 * rng.standard_normal(5)).astype(np.float32)}
        out.append(w)
    return out


def _drift_mask_expected():
    return {"a": np.arange(10, dtype=np.int32), "b": np.zeros(0, np.int32)}


@pytest.mark.parametrize("make", [lambda: MomentumScorer(beta=0.8), lambda: MomentumScorer(window=9),
                                  lambda: VarianceScorer(), lambda: VarianceScorer("snr_weighted"),
                                  lambda: MagnitudeScorer()])
def test_scorers_rank_drift_first(make):
    scorer = make()
    for params in _trajectory():
        scorer.update(params)
    scores = scorer.scores()
    mask = sparsejax.topk_mask(scores, sparsity=1 - 10 / 105)
    for key, expected in _drift_mask_expected().items():
        np.testing.assert_array_equal(mask[key], expected)


def test_magnitude_and_momentum_values():
    traj = _trajectory(steps=6)
    mag = score_trajectory(traj, "magnitude")
    np.testing.assert_allclose(mag["a"], np.abs(traj[-1]["a"] - traj[0]["a"]), rtol=1e-6)
    beta = 0.7
    m = np.zeros((10, 10))
    for prev, cur in zip(traj, traj[1:]):
        m = beta * m + (1 - beta) * (cur["a"].astype(np.float64) - prev["a"])
    got = score_trajectory(traj, "momentum", beta=beta)["a"]
    np.testing.assert_allclose(got, np.abs(m) / (1 - beta ** 6), rtol=1e-4, atol=1e-7)
    last = score_trajectory(traj, "momentum", beta=0.0)["b"]
    np.testing.assert_allclose(last, np.abs(traj[-1]["b"] - traj[-2]["b"]), rtol=1e-6)
    assert MomentumScorer(window=19).beta == pytest.approx(0.9)


def test_variance_matches_numpy_and_noise_scores_low():
    traj = _trajectory(steps=30, seed=3)
    scorer = VarianceScorer()
    for params in traj:
        scorer.update(params)
    deltas = np.stack([c["a"].astype(np.float64) - p["a"] for p, c in zip(traj, traj[1:])])
    np.testing.assert_allclose(scorer.variance()["a"], deltas.var(axis=0), rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(scorer.mean()["a"], deltas.mean(axis=0), rtol=1e-3, atol=1e-7)
    snr = scorer.scores()["a"]
    assert snr[0].min() > 100 * snr[1:].max()  # drift >> noise under mu^2 / var
    raw = VarianceScorer("variance")
    for params in traj:
        raw.update(params)
    assert raw.scores()["a"][0].max() < raw.scores()["a"][1:].min()  # raw variance: the reverse


def test_never_moving_entries_score_zero_and_errors():
    frozen = {"w": np.ones(4, np.float32)}
    for kind in ("magnitude", "momentum", "variance"):
        scores = score_trajectory([frozen, frozen, frozen], kind)
        np.testing.assert_array_equal(scores["w"], 0.0)
    scorer = VarianceScorer()
    scorer.update(frozen)
    with pytest.raises(ValueError, match="at least 2"):
        scorer.scores()
    with pytest.raises(AnalysisError, match="structure"):
        scorer.update({"v": np.ones(4, np.float32)})
    with pytest.raises(AnalysisError, match="shape"):
        scorer.update({"w": np.ones(5, np.float32)})


def test_scorers_stream_from_folders(tmp_path):
    traj = _trajectory(steps=4)
    folders = []
    for t, params in enumerate(traj):
        d = tmp_path / f"step{t}"
        d.mkdir()
        save_file({"model.a.weight": params["a"], "model.b.weight": params["b"]},
                  str(d / "model.safetensors"))
        folders.append(str(d))
    for kind in ("magnitude", "momentum", "variance"):
        from_dicts = score_trajectory(traj, kind)
        from_folders = score_trajectory(folders, kind)
        np.testing.assert_array_equal(from_folders["model.a.weight"], from_dicts["a"])
        np.testing.assert_array_equal(from_folders["model.b.weight"], from_dicts["b"])
    mask = sparsejax.topk_mask(from_folders, sparsity=0.9)
    assert sparsejax.num_active(mask) == round(0.1 * 105)
