"""``python -m sparsejax.analysis predict-mask``: the mask it writes is the global top-k of the
score, recomputed here with NumPy from the in-memory params (not from the files, not through
the HF name table), and it loads through what ``--mask-path`` uses."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from sparsejax.analysis.__main__ import main
from sparsejax.config import TrainableConfig
from sparsejax.masks import load_mask, num_active
from sparsejax.masks.core import leaves_with_paths
from sparsejax.models import DecoderConfig, init_model, save_hf
from sparsejax.trainable.sparse import build_mask

STEPS = 3


def _config(**changes) -> DecoderConfig:
    fields = dict(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24,
                  num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                  tie_word_embeddings=False, param_dtype="float32")
    return DecoderConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """A tiny untied Llama saved as base/ and three perturbed snapshots step1..3/; returns
    (root, graphdef, [params_0 .. params_3] as {mask path: float32 array})."""
    root = tmp_path_factory.mktemp("trajectory")
    graphdef, params = nnx.split(init_model(_config(), seed=0))
    rng = np.random.default_rng(1)
    states = [params]
    for _ in range(STEPS):  # a drift per entry plus noise, so the scores differ by score kind
        states.append(jax.tree.map(
            lambda x: (np.asarray(x) + rng.normal(0.0, 0.01, np.shape(x))).astype(np.float32),
            states[-1]))
    folders = ["base"] + [f"step{t}" for t in range(1, STEPS + 1)]
    flat = []
    for name, state in zip(folders, states, strict=True):
        save_hf(nnx.merge(graphdef, state), root / name)
        paths, leaves, _ = leaves_with_paths(state)
        flat.append({p: np.asarray(x, np.float32) for p, x in zip(paths, leaves, strict=True)})
    return root, params, flat


def _folders(root):
    return [str(root / "base")] + [str(root / f"step{t}") for t in range(1, STEPS + 1)]


def _topk(scores: dict[str, np.ndarray], sparsity: float) -> dict[str, np.ndarray]:
    """Global top-k by a full argsort: k = round((1 - sparsity) * N)."""
    names = list(scores)
    flat = np.concatenate([scores[n].reshape(-1) for n in names])
    k = int(round((1.0 - sparsity) * flat.size))
    keep = np.sort(np.argsort(-flat, kind="stable")[:k])
    out, start = {}, 0
    for n in names:
        size = scores[n].size
        out[n] = keep[(keep >= start) & (keep < start + size)] - start
        start += size
    return out


def _written(path) -> dict[str, np.ndarray]:
    arrays, _ = load_mask(str(path))
    return arrays


def test_magnitude_mask_is_the_global_topk_of_the_displacement(trajectory, tmp_path, capsys):
    root, params, flat = trajectory
    out = tmp_path / "mask.safetensors"
    assert main(["predict-mask", *_folders(root), "--score", "magnitude", "--sparsity", "0.9",
                 "--out", str(out), "--no-progress"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("predict-mask: kept ") and "per-tensor density" in line
    assert len(line.splitlines()) == 1

    want = _topk({p: np.abs(flat[-1][p] - flat[0][p]) for p in flat[0]}, 0.9)
    got = _written(out)
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)
    total = sum(x.size for x in flat[0].values())
    assert sum(x.size for x in got.values()) == round(0.1 * total)
    # Global, not per tensor: the tensors keep different fractions.
    assert len({round(got[p].size / flat[0][p].size, 4) for p in got}) > 1

    # What --mask-path does: build_mask -> load_mask(path, like=params), validated.
    mask = build_mask(TrainableConfig(sparsity=0.9, mask_path=str(out)), params)
    assert num_active(mask) == round(0.1 * total)
    assert jax.tree.structure(mask) == jax.tree.structure(params)

    sidecar = json.loads((tmp_path / "mask.json").read_text())
    assert sidecar["score"] == "magnitude" and sidecar["sparsity"] == 0.9
    assert sidecar["snapshots"] == _folders(root)[1:] and sidecar["kept"] == round(0.1 * total)
    _, meta = load_mask(str(out))
    assert meta["total"] == str(total) and meta["source"] == "predict-mask"


def test_momentum_with_density_and_exclusions(trajectory, tmp_path, capsys):
    root, params, flat = trajectory
    out, side = tmp_path / "m.safetensors", tmp_path / "side.json"
    beta = 0.5
    assert main(["predict-mask", *_folders(root), "--score", "momentum", "--beta", str(beta),
                 "--density", "0.05", "--exclude", "embed", "--exclude", "norm",
                 "--out", str(out), "--json", str(side), "--no-progress"]) == 0
    # The EMA of the deltas in the scorer's float32 order of operations; the bias
    # correction divides every score by the same number, so it leaves the ranking alone.
    scores = {}
    for p in flat[0]:
        if "embed" in p or "norm" in p:
            continue
        m = np.zeros_like(flat[0][p])
        for t in range(1, STEPS + 1):
            m *= beta
            m += (1.0 - beta) * (flat[t][p] - flat[t - 1][p])
        scores[p] = np.abs(m)
    want = _topk(scores, 1.0 - 0.05)
    got = _written(out)
    for p, idx in got.items():
        if p in want:
            np.testing.assert_array_equal(idx, want[p], err_msg=p)
        else:
            assert ("embed" in p or "norm" in p) and idx.size == 0, p
    eligible = sum(x.size for x in scores.values())
    assert sum(x.size for x in got.values()) == round(0.05 * eligible)
    assert "lm_head" in " ".join(p for p in want)  # the untied head (transposed) is scored
    assert json.loads(side.read_text())["exclude"] == ["embed", "norm"]
    assert num_active(build_mask(TrainableConfig(mask_path=str(out)), params)) == round(
        0.05 * eligible)
    capsys.readouterr()


def test_tensors_the_model_does_not_use_are_ignored(trajectory, tmp_path, capsys):
    """A snapshot with an extra tensor (a rotary buffer) gives the same mask."""
    from safetensors.numpy import load_file, save_file
    root, _, _ = trajectory
    folders = _folders(root)
    extra = tmp_path / "extra"
    extra.mkdir()
    tensors = load_file(str(root / f"step{STEPS}" / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    save_file(tensors, str(extra / "model.safetensors"))
    runs = []
    for last in (folders[-1], str(extra)):
        out = tmp_path / f"{len(runs)}.safetensors"
        assert main(["predict-mask", *folders[:-1], last, "--score", "variance",
                     "--variance-score", "snr", "--sparsity", "0.8", "--out", str(out),
                     "--no-progress"]) == 0
        runs.append(_written(out))
    assert runs[0].keys() == runs[1].keys()
    for p in runs[0]:
        np.testing.assert_array_equal(runs[0][p], runs[1][p])
    capsys.readouterr()


@pytest.mark.parametrize("case", ["missing", "sparsity", "shapes", "tensor", "option", "empty"])
def test_bad_input_is_one_error_line(trajectory, tmp_path, capsys, case):
    root, _, _ = trajectory
    folders = _folders(root)
    out = str(tmp_path / "mask.safetensors")
    argv = ["predict-mask", *folders, "--score", "magnitude", "--sparsity", "0.9", "--out", out]
    expect = {"missing": "checkpoint folder not found", "sparsity": "sparsity must be in [0, 1)",
              "shapes": "has shape", "tensor": "no tensor model.norm.weight",
              "option": "--beta applies to --score momentum only",
              "empty": "no tensor is eligible"}[case]
    if case == "missing":
        argv[2] = str(tmp_path / "nowhere")
    elif case == "sparsity":
        argv[argv.index("0.9")] = "1.5"
    elif case == "shapes":  # a snapshot of a wider MLP: same tensor names, other shapes
        graphdef, other = nnx.split(init_model(_config(intermediate_size=32), seed=0))
        save_hf(nnx.merge(graphdef, other), tmp_path / "wide")
        argv[3] = str(tmp_path / "wide")
    elif case == "tensor":  # a snapshot without the final norm
        from safetensors.numpy import load_file, save_file
        tensors = load_file(str(root / "step1" / "model.safetensors"))
        del tensors["model.norm.weight"]
        (tmp_path / "cut").mkdir()
        save_file(tensors, str(tmp_path / "cut" / "model.safetensors"))
        argv[3] = str(tmp_path / "cut")
    elif case == "option":
        argv += ["--beta", "0.9"]
    else:
        argv += ["--include", "no_such_tensor"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expect in err, err
    assert not (tmp_path / "mask.safetensors").exists()
