"""GRPO (also with several updates per generation batch) and DPO (also a weighted sum of
DPO-family losses with LD-DPO, an f-divergence and WPO weights) on a mesh of 8 host CPU
devices equal the one-device run; the trainers' optimizer step stays on its devices for
row-balanced masks; bad layouts fail in one line.

XLA's device count is fixed when JAX starts, so the 8-device cases run in ONE subprocess
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) that pays JAX's start once and
reports every case as JSON; the single-device references run in the same process with
no mesh. A tiny float32 decoder (vocabulary 64) and a character tokenizer keep it fast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(r"""
    import json, re, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import sparsejax.parallel.sharding as sh
    from sparsejax.models import config as model_config
    from sparsejax.models.decoder import init_model
    from sparsejax.trainers import GRPOConfig, GRPOTrainer, TrainableConfig
    from sparsejax.trainers.dpo import DPOTrainer
    from sparsejax.config import DPOConfig
    from sparsejax.trainable import build_trainable
    from sparsejax.trainable.base import memory_record

    assert jax.device_count() == 8
    sh.MIN_SHARD_BYTES = 256  # kernels and the embedding split; biases and norms replicated

    class CharTokenizer:
        # ids 0/1 are pad/eos; characters map to 2..63.
        eos_token_id, pad_token_id, chat_template = 1, 0, None
        def __len__(self):
            return 64
        def encode(self, text):
            return [2 + (ord(c) % 62) for c in text]
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [self.encode(t) for t in texts]}
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + (i - 2) % 26) for i in ids if i > 1)

    tok = CharTokenizer()
    cfg = model_config.DecoderConfig(
        model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=True,
        tie_word_embeddings=True, param_dtype="float32")
    # Qwen3-MoE: 8 experts (top 2) in layer 0, their stacks split over fsdp; layer 1 is a
    # dense Qwen3 layer (q/k norms, no biases).
    moe_cfg = model_config.DecoderConfig(
        model_type="qwen3_moe", vocab_size=64, hidden_size=16, intermediate_size=32,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=False,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
        mlp_only_layers=(1,), param_dtype="float32")
    MODEL = {"cfg": cfg}
    def model():
        return nnx.split(init_model(MODEL["cfg"], seed=0))

    def reward(completions, answers):
        return [len(set(c)) / 4.0 for c in completions]

    prompts = [tok.encode(q) for q in ("1+1=", "two plus", "4*2?", "seven", "x", "abc de",
                                        "9-3", "ten")]
    answers = ["2"] * len(prompts)
    pairs = [{"prompt": f"q{i} is", "chosen": "yes" * (1 + i % 2), "rejected": "no"}
             for i in range(8)]

    def host(tree):
        return [np.asarray(x) for x in jax.tree.leaves(tree)]

    def rel(a, b):  # ||a - b|| / ||b|| over all params (Frobenius)
        num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b))
        return (num / max(sum(float(np.sum(y ** 2)) for y in b), 1e-30)) ** 0.5

    def max_abs(a, b):
        return max(float(np.max(np.abs(x - y), initial=0.0)) for x, y in zip(a, b))

    def grpo(mesh, sparsity, strategy, **options):
        graphdef, params = model()
        config = GRPOConfig(steps=3, prompts_per_step=8, num_generations=2,
                            max_new_tokens=4, micro_batch_size=8, generation_batch_size=16,
                            beta=0.05 if sparsity else 0.0, mesh=mesh, eval_batch_size=8,
                            remat="none", **options)
        sparse = TrainableConfig(sparsity=sparsity, learning_rate=1e-2 if sparsity else 1e-3,
                              mask_strategy=strategy, sparse_grads="on")
        t = GRPOTrainer(graphdef, params, tok, reward, config, sparse, tempfile.mkdtemp())
        t.records = [t.train_step(prompts, answers) for _ in range(3)]
        return t

    # A weighted sum of DPO-family losses with LD-DPO, an f-divergence and WPO weights.
    FAMILY = dict(loss_type=("sigmoid", "ipo", "sft", "discopop"),
                  loss_weights=(1.0, 0.5, 0.3, 1.0), ld_alpha=0.5, use_weighting=True,
                  f_divergence_type="js_divergence")

    def dpo(mesh, sparsity, strategy, lora=False, family=False):
        graphdef, params = model()
        trainable = None
        if lora:  # the seam's LoRA variant (rank 8 on every projection), fresh B = 0
            from sparsejax.lora import LoraConfig
            from sparsejax.trainable.lora import LoraAdapter
            trainable = LoraAdapter(TrainableConfig(learning_rate=1e-2), params,
                                  LoraConfig(rank=8), seed=1, mesh=mesh)
        config = DPOConfig(steps=3, batch_size=8, micro_batch_size=8, mesh=mesh,
                           max_prompt_length=8, max_completion_length=8, remat="none",
                           **(FAMILY if family else {}))
        sparse = TrainableConfig(sparsity=sparsity, learning_rate=1e-2 if sparsity else 1e-3,
                              mask_strategy=strategy, sparse_grads="on")
        t = DPOTrainer(graphdef, params, tok, config, sparse, tempfile.mkdtemp(),
                       trainable=trainable)
        enc = t.encode(pairs)
        ref = np.stack(t.reference_logprobs(enc), axis=1)
        t.records = [t.train_step(enc, ref) for _ in range(3)]
        return t

    import time
    result = {}
    def report(key, value):
        result[key] = value
        print("CASE", key, json.dumps(value), flush=True, file=sys.stderr)
    CASES = json.loads(sys.argv[1]) if len(sys.argv) > 1 else None
    lora_dpo = lambda mesh, sparsity, strategy: dpo(mesh, sparsity, strategy, lora=True)
    family_dpo = lambda mesh, sparsity, strategy: dpo(mesh, sparsity, strategy, family=True)
    # two optimizer steps per generation batch, two passes: old log-probs, clipping live
    iterations_grpo = lambda mesh, sparsity, strategy: grpo(
        mesh, sparsity, strategy, steps_per_generation=4, num_iterations=2)
    for name, run, kinds in (("grpo", grpo, ("sparse", "dense")),
                             ("grpo", iterations_grpo, ("iterations",)),
                             ("grpo", grpo, ("moe-sparse", "moe-dense")),
                             ("dpo", dpo, ("moe-sparse", "moe-dense")),
                             ("dpo", dpo, ("sparse", "dense")), ("dpo", lora_dpo, ("lora",)),
                             ("dpo", family_dpo, ("family",))):
        for kind in kinds:
            sparsity = 0.0 if kind.endswith("dense") else 0.9
            MODEL["cfg"] = moe_cfg if kind.startswith("moe") else cfg
            if CASES is not None and f"{name}/{kind}" not in CASES:
                continue
            t0 = time.process_time()
            ref = run("", sparsity, "row_balanced")
            base = host(ref.params)
            init = host(ref.trainable.policy_params(model()[1]))  # LoRA: with fresh factors
            for mesh in (("data=2,fsdp=4",) if kind in ("lora", "family", "iterations",
                                                         "moe-sparse", "moe-dense")
                         else ("fsdp=8", "data=2,fsdp=4")):
                t = run(mesh, sparsity, "auto")
                report(f"{name}/{kind}/{mesh}", {
                    "cpu_s": time.process_time() - t0,
                    "rel": rel(host(t.params), base),
                    "max_abs": max_abs(host(t.params), base),
                    "changed": max_abs(base, init),
                    # the trained change itself: Adam's g / (|g| + eps) makes entries
                    # with near-zero gradients sensitive to summation order (reported)
                    "update_rel": rel([x - z for x, z in zip(host(t.params), init)],
                                      [y - z for y, z in zip(base, init)]),
                    "metrics": [[r[k] for k in ("loss", "grad_norm")] for r in t.records],
                    "metrics_1": [[r[k] for k in ("loss", "grad_norm")] for r in ref.records],
                    "specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(t.params)}),
                    "memory": memory_record(t.trainable, t.params, t.opt_state, t.mesh),
                    "memory_1": memory_record(ref.trainable, ref.params, ref.opt_state,
                                                 None)})

    # A batch the batch axis does not divide: one line, before any heavy work.
    errors = {}
    graphdef, params = model()
    for name, make in (
            ("grpo", lambda: GRPOTrainer(graphdef, params, tok, reward, GRPOConfig(
                prompts_per_step=8, num_generations=2, micro_batch_size=4, mesh="fsdp=8"),
                TrainableConfig(), tempfile.mkdtemp())),
            ("dpo", lambda: DPOTrainer(graphdef, params, tok, DPOConfig(
                batch_size=12, micro_batch_size=6, mesh="data=2,fsdp=4"), TrainableConfig(),
                tempfile.mkdtemp()))):
        try:
            make()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    report("errors", errors)

    # The trainers' optimizer step on the fsdp mesh: compiled HLO collectives.
    COLLECTIVE = re.compile(r"= (\S+|\([^)]*\)) (all-gather|all-reduce|all-to-all|"
                            r"collective-permute|reduce-scatter)(?:-start)?\(")
    _, params = model()
    rng = np.random.default_rng(1)
    for strategy, backend in (("row_balanced", "xla"), ("per_tensor", "xla"),
                              ("row_balanced", "interpret")):
        if CASES is not None and f"step/{backend}" not in CASES:
            continue
        t0 = time.process_time()
        u = build_trainable(TrainableConfig(sparsity=0.75, learning_rate=1e-2, mask_strategy=strategy,
                                 backend=backend), params, mesh="fsdp=8")
        p8 = u.policy_params(jax.tree.map(jnp.copy, params))
        s8 = u.init(p8)
        g = [jax.tree.map(lambda i: jnp.asarray(rng.normal(size=i.shape), jnp.float32),
                          s8.indices) for _ in range(3)]
        hlo = type(u).apply.lower(u, p8, sh.put(g[0], u.shardings["mask"]), s8
                                  ).compile().as_text()
        u1 = build_trainable(TrainableConfig(sparsity=0.75, learning_rate=1e-2, mask_strategy=strategy,
                                  backend="xla"), params)
        p1 = jax.tree.map(jnp.copy, params)
        s1 = u1.init(p1)
        for gi in g:
            p8, s8, _ = u.apply(p8, sh.put(gi, u.shardings["mask"]), s8)
            p1, s1, _ = u1.apply(p1, jax.tree.map(jnp.asarray, gi), s1)
        report(f"step/{strategy}/{backend}", {
            "cpu_s": time.process_time() - t0, "rel": rel(host(p8), host(p1)),
            # (op, result shape) of every collective; "f32[]" is a scalar (the norm)
            "collectives": sorted({(op, shape) for shape, op in COLLECTIVE.findall(hlo)}),
            "communicating": sh.step_communicates(u.mask, u.shardings["params"]),
            "state_spec": sorted({str(x.sharding.spec) for x in jax.tree.leaves(s8.mu)})})

    # The sparse backward's sampled product per device (the CPU kernel in shard_map):
    # the same gradient as on one device, no token block leaves its device.
    from sparsejax import sparse_backward as sparse_grads
    from sparsejax.models import ops
    from sparsejax.kernels import cpu_sampled_product
    from sparsejax.optim.sparse import gather
    if CASES is None or "per_shard_product" in CASES:
        mesh = sh.as_mesh("data=2,fsdp=4")
        rng = np.random.default_rng(3)
        w = jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)
        x = jnp.asarray(rng.normal(size=(16, 5, 24)), jnp.float32)
        idx = jnp.asarray(np.sort(rng.choice(960, 97, replace=False)), jnp.int32)
        v = gather(w, idx)
        def grad(m, backend):
            loss = lambda v_, x_: jnp.sum(jnp.sin(ops.matmul(
                x_, sparse_grads.SparseWeight(w, idx, v_, False, backend, m))))
            return jax.jit(jax.grad(loss))
        g1 = grad(None, "xla")(v, x)
        x8 = jax.device_put(x, sh.batch_sharding(mesh))
        for backend in ("xla", "interpret"):  # the CPU kernel; the Pallas one, interpreted
            f8 = grad(mesh, backend)
            hlo = f8.lower(v, x8).compile().as_text()
            report(f"per_shard_product/{backend}", {
                "rel": rel(host(f8(v, x8)), host(g1)),
                "kernel": (cpu_sampled_product.TARGET in hlo) == (
                    backend == "xla" and cpu_sampled_product.available()),
                "collectives": sorted({(op, shape) for shape, op in COLLECTIVE.findall(hlo)})})
    print("RESULT" + json.dumps(result))
""")


@pytest.fixture(scope="module")
def result():
    # Optimization level 0 compiles ~40% faster on XLA:CPU; the one-device references
    # run in the same process with the same flags.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=1500)  # minutes under load; ~2 on a quiet CPU
    assert out.returncode == 0, out.stderr[-4000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("trainer, kind, mesh", [
    (t, k, m) for t in ("grpo", "dpo") for k in ("sparse", "dense")
    for m in ("fsdp=8", "data=2,fsdp=4")] + [("dpo", "lora", "data=2,fsdp=4"),
                                             ("dpo", "family", "data=2,fsdp=4"),
                                             ("grpo", "iterations", "data=2,fsdp=4")]
                         + [(t, f"moe-{k}", "data=2,fsdp=4") for t in ("grpo", "dpo")
                            for k in ("sparse", "dense")])
def test_sharded_run_equals_one_device(result, trainer, kind, mesh):
    r = result[f"{trainer}/{kind}/{mesh}"]
    assert r["changed"] > 1e-3, r  # training moved the params (the check can fail)
    assert r["rel"] <= 1e-5 and r["max_abs"] <= 1e-5, r
    # Loss and gradient norm of every step agree (the gradient itself, through its norm).
    np.testing.assert_allclose(r["metrics"], r["metrics_1"], rtol=1e-5, atol=1e-7)
    assert any("fsdp" in s for s in r["specs"]), r  # params really are split
    mem, mem1 = r["memory"], r["memory_1"]
    # Split params and state: each device holds less than the whole.
    assert mem["params_bytes_per_device"] < mem1["params_bytes_per_device"], r
    assert mem["optimizer_state_bytes_per_device"] < mem1["optimizer_state_bytes_per_device"]
    assert mem["grad_accumulator_bytes_per_device"] < mem1["grad_accumulator_bytes_per_device"]
    assert mem["devices"] == 8 and mem1["devices"] == 1, r
    if kind == "family":  # the loss family learns (the one-device run, which the mesh equals)
        losses = [loss for loss, _ in r["metrics_1"]]
        assert losses[-1] < losses[0], r


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_row_balanced_step_gathers_no_parameter(result, backend):
    r = result[f"step/row_balanced/{backend}"]
    assert r["rel"] <= 1e-6, r
    # No all-gather of any parameter: the only collectives reduce scalars (the global
    # gradient norm and the finiteness check), nothing of a tensor's size moves.
    assert r["collectives"], r  # the regex sees the norm's all-reduce (it can match)
    assert all(op == "all-reduce" and not re.search(r"\[\d", shape)
               for op, shape in r["collectives"]), r
    assert r["communicating"] == [], r
    assert any("fsdp" in s for s in r["state_spec"]), r  # moments split with their rows


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_sampled_product_runs_per_device(result, backend):
    r = result[f"per_shard_product/{backend}"]
    assert r["rel"] <= 1e-5, r  # the devices' partial sums add up in another order
    assert r["kernel"], r  # the CPU kernel where it builds (xla), else no custom call
    # The only collective sums the 97 entries' partial gradients; no token block (a
    # [tokens, 24] or [tokens, 40] array) is gathered.
    assert [op for op, _ in r["collectives"]] == ["all-reduce"], r
    assert r["collectives"][0][1].startswith("f32[97]"), r


def test_flat_mask_step_communicates(result):
    r = result["step/per_tensor/xla"]
    assert r["rel"] <= 1e-6, r
    assert r["communicating"], r  # the warning's list
    # The control: vectors of active values cross devices (gathered or reduced).
    assert any(re.search(r"\[\d", shape) for _, shape in r["collectives"]), r


def test_batch_that_does_not_divide_fails_in_one_line(result):
    grpo, dpo = result["errors"]["grpo"], result["errors"]["dpo"]
    assert grpo and "\n" not in grpo and "micro_batch_size (4)" in grpo and "fsdp=8" in grpo
    assert dpo and "\n" not in dpo and "micro_batch_size (6)" in dpo and "data=2,fsdp=4" in dpo


def test_mesh_specs_and_one_line_errors():
    from sparsejax.parallel import sharding  # one device here: the cheap in-process checks
    assert sharding.parse_mesh("", 8) == {"data": 1, "fsdp": 1}
    assert sharding.parse_mesh(None, 8) == {"data": 1, "fsdp": 1}
    assert sharding.parse_mesh("auto", 8) == {"data": 1, "fsdp": 8}
    assert sharding.parse_mesh("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4}
    assert sharding.parse_mesh(" fsdp=8 ", 8) == {"data": 1, "fsdp": 8}
    for spec, words in (("data=2,fsdp=2", ["'data=2,fsdp=2'", "4 devices", "is 8"]),
                        ("model=8", ["'model=8'", "unknown axis 'model'"]),
                        ("data=two", ["axis data needs a size"]),
                        ("data=0,fsdp=8", ["axis data needs a size"]),
                        ("fsdp=4,fsdp=2", ["given twice"])):
        with pytest.raises(ValueError) as e:
            sharding.parse_mesh(spec, 8)
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), e.value
    mesh = sharding.make_mesh("auto")
    assert mesh.axis_names == ("data", "fsdp")
    assert sharding.as_mesh("") is None and sharding.as_mesh(None) is None


def test_rule_table():
    from jax.sharding import PartitionSpec as P

    from sparsejax.parallel.sharding import leaf_spec
    big = 1 << 20
    assert leaf_spec((64, 48), 4, 8, 0) == P("fsdp", None)  # rows first
    assert leaf_spec((6, 48), 4, 8, 0) == P(None, "fsdp")  # else the largest dividing axis
    assert leaf_spec((6, 16, 40), 4, 8, 0) == P(None, None, "fsdp")
    assert leaf_spec((6, 7), 4, 8, 0) == P()  # nothing divides
    assert leaf_spec((big,), 4, 8, 0) == P()  # vectors (norms, biases) replicated
    assert leaf_spec((64, 48), 4, 8) == P()  # below MIN_SHARD_BYTES
    assert leaf_spec((4096, 4096), 2, 8) == P("fsdp", None)
    assert leaf_spec((4096, 4096), 2, 1) == P()  # no fsdp axis: replicated


def test_bytes_per_device_counts_shards():
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sparsejax.parallel import sharding
    mesh = sharding.make_mesh("auto")
    x = jax.device_put(jnp.zeros((8, 4), jnp.float32), NamedSharding(mesh, P("fsdp", None)))
    n = jax.device_count()
    assert sharding.bytes_per_device({"x": x, "s": jnp.zeros((), jnp.int32)}) == 128 // n + 4
    spec = jax.ShapeDtypeStruct((16,), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    assert sharding.bytes_per_device([spec]) == 32
