"""KTO trainer: learns on a tiny Qwen2 model (with the real Qwen2.5 tokenizer), sparse and
full, resumes bit-exactly from a checkpoint, rejects bad settings in one line, and on a
mesh of 8 host CPU devices equals the one-device run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from sparsejax.config import KTOConfig, TrainableConfig
from sparsejax.models import load_hf
from sparsejax.trainers.kto import KTOTrainer
from sparsejax.trainers.kto_data import is_paired, unpair

from paths import REPO
from tiny_models import save_tiny_qwen2


def toy_examples(n: int) -> list[dict]:
    """Trivially separable labels: "yes" desirable, "no" undesirable, alternating."""
    return [{"prompt": f"Is {i} + {i} = {2 * i}?", "completion": "yes" if i % 2 else "no",
             "label": bool(i % 2)} for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    model = save_tiny_qwen2(root / "model")
    data = root / "data"
    data.mkdir()
    with open(data / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in toy_examples(8))
    import transformers
    return {"root": root, "model": model, "data": data,
            "tok": transformers.AutoTokenizer.from_pretrained(model)}


def trainer(tiny, out, sparsity: float, **cfg) -> KTOTrainer:
    graphdef, params = nnx.split(load_hf(tiny["model"]))
    config = KTOConfig(**{**dict(steps=4, batch_size=4, micro_batch_size=2, beta=0.5,
                                 max_prompt_length=32, max_completion_length=4,
                                 logprob_chunk_size=64, eval_every=0, save_every=2,
                                 remat="none"), **cfg})
    sparse = TrainableConfig(sparsity=sparsity, learning_rate=5e-2 if sparsity else 1e-2,
                             backend="xla")
    return KTOTrainer(graphdef, params, tiny["tok"], config, sparse, out)


def metrics(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def host(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sparse_run_learns_evaluates_and_resumes_exactly(tiny):
    data = toy_examples(8)
    full = tiny["root"] / "sparse_full"
    t = trainer(tiny, full, 0.9)
    final = t.train(data, toy_examples(6), progress=False)
    train = metrics(full)
    assert [r["step"] for r in train] == [0, 1, 2, 3]
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen",
                "grad_norm", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert abs(train[0]["rewards/margins"]) < 1e-5  # the policy starts as the reference
    assert train[-1]["loss"] < train[0]["loss"], [r["loss"] for r in train]
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"] + 0.1
    assert final["kind"] == "eval" and final["eval_examples"] == 6
    assert final["eval_rewards/margins"] > 0 and np.isfinite(final["eval_loss"])
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["2", "4"]

    # A run stopped after step 2, resumed to the end: the same params, bit for bit.
    split = tiny["root"] / "sparse_split"
    shutil.copytree(full / "checkpoints" / "2", split / "checkpoints" / "2")
    r = trainer(tiny, split, 0.9)
    r.train(data, resume=True, progress=False)
    assert r.step == 4
    for a, b in zip(host(t.params), host(r.params)):
        np.testing.assert_array_equal(a, b)
    assert [x["loss"] for x in metrics(split)] == [x["loss"] for x in train[2:]]


def test_full_finetuning_learns(tiny):
    out = tiny["root"] / "dense"
    t = trainer(tiny, out, 0.0, steps=3, save_every=0)
    base = host(t.params)
    t.train(toy_examples(8), progress=False)
    train = metrics(out)
    assert train[-1]["loss"] < train[0]["loss"], [r["loss"] for r in train]
    assert t.trainable.num_trainable(t.params) == sum(x.size for x in base)
    assert max(float(np.abs(a - b).max()) for a, b in zip(host(t.params), base)) > 1e-3


def test_unpairs_preference_pairs():
    pairs = [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    assert is_paired(pairs) and not is_paired(toy_examples(2))
    assert unpair(pairs) == [{"prompt": "q", "completion": "a", "label": True},
                             {"prompt": "q", "completion": "b", "label": False}]


@pytest.fixture(scope="module")
def cli():
    from sparsejax.cli import kto
    return kto


@pytest.mark.parametrize("extra,needle", [
    (["--micro-batch-size", "1", "--batch-size", "4"], "--micro-batch-size must be >= 2"),
    (["--loss-type", "bco"], "--loss-type"),
    (["--undesirable-weight", "-1"], "--undesirable-weight"),
    (["--dataset", "LABEL"], "label must be true or false"),
])
def test_bad_settings_fail_in_one_line(tiny, cli, capsys, extra, needle):
    if "LABEL" in extra:
        bad = tiny["root"] / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "q", "completion": "a", "label": "yes"}) + "\n")
        extra = ["--dataset", str(bad)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tiny["model"]), "--dataset", str(tiny["data"]),
                  "--out-dir", str(tiny["root"] / "bad"), *extra])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert needle in lines[-1] and "error:" in lines[-1], lines


def test_help(cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--desirable-weight", "--undesirable-weight",
                                        "--loss-type", "--sparsity", "--resume", "--mesh"))


# ---------------------------------------------------------------------- 8 devices

SHARDED = textwrap.dedent(r"""
    import json, tempfile
    import jax, numpy as np
    from flax import nnx
    import sparsejax.parallel.sharding as sh
    from sparsejax.config import KTOConfig, TrainableConfig
    from sparsejax.models import config as model_config
    from sparsejax.models.decoder import init_model
    from sparsejax.trainers.kto import KTOTrainer

    assert jax.device_count() == 8
    sh.MIN_SHARD_BYTES = 256  # kernels and the embedding split

    class CharTokenizer:  # ids 0/1 are pad/eos; characters map to 2..63
        eos_token_id, pad_token_id, chat_template = 1, 0, None
        def __len__(self):
            return 64
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[2 + (ord(c) % 62) for c in t] for t in texts]}

    cfg = model_config.DecoderConfig(
        model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=True,
        tie_word_embeddings=True, param_dtype="float32")
    examples = [{"prompt": f"q{i} is", "completion": "yes" * (1 + i % 3) if i % 2 else "no",
                 "label": bool(i % 2)} for i in range(12)]

    def run(mesh):
        graphdef, params = nnx.split(init_model(cfg, seed=0))
        config = KTOConfig(steps=2, batch_size=8, micro_batch_size=8, mesh=mesh, beta=0.5,
                           max_prompt_length=8, max_completion_length=8, remat="none",
                           desirable_weight=1.3)
        t = KTOTrainer(graphdef, params, CharTokenizer(), config,
                       TrainableConfig(sparsity=0.9, learning_rate=1e-2,
                                       mask_strategy="row_balanced" if not mesh else "auto",
                                       sparse_grads="on"), tempfile.mkdtemp())
        enc = t.encode(examples)
        ref = t.reference_logprobs(enc)
        ref_kl = t.reference_kl_logprobs(enc, range(2))
        records = [t.train_step(enc, ref, ref_kl) for _ in range(2)]
        return t, [[r[k] for k in ("loss", "grad_norm", "kl")] for r in records]

    one, m1 = run("")
    init = [np.asarray(x) for x in jax.tree.leaves(nnx.split(init_model(cfg, seed=0))[1])]
    eight, m8 = run("data=2,fsdp=4")
    a = [np.asarray(x) for x in jax.tree.leaves(eight.params)]
    b = [np.asarray(x) for x in jax.tree.leaves(one.params)]
    rel = (sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
           / sum(float(np.sum(y ** 2)) for y in b)) ** 0.5
    print("RESULT" + json.dumps({
        "rel": rel, "metrics": m8, "metrics_1": m1,
        "changed": max(float(np.abs(x - y).max()) for x, y in zip(b, init)),
        "specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(eight.params)})}))
""")


def test_eight_devices_equal_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"))
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                         text=True, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1][6:])
    assert r["changed"] > 1e-3, r  # training moved the params (the check can fail)
    assert r["rel"] <= 1e-5, r
    np.testing.assert_allclose(r["metrics"], r["metrics_1"], rtol=1e-5, atol=1e-7)
    assert all(kl >= 0 for _, _, kl in r["metrics_1"]) and r["metrics_1"][-1][2] > 0, r
    assert any("fsdp" in s for s in r["specs"]), r  # params really are split
