"""Cases of tests/test_distributed.py, run in subprocesses with host CPU devices.

``python tests/distributed_worker.py single|trainer OUT`` (8 host devices) and
``python tests/distributed_worker.py multi OUT PROCESS_ID PORT`` (2 processes x 4
devices, ``jax.distributed`` on localhost) run every case of their group and print one
JSON line per case: ``{"case": name, "ok": bool, "error": first line}``. One process pays
JAX's start and the compiles once for all its cases.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

MODE = sys.argv[1]
OUT = Path(sys.argv[2])
if MODE == "multi":
    PROCESS_ID, PORT = int(sys.argv[3]), int(sys.argv[4])
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
else:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparsejax.parallel import distributed  # noqa: E402

if MODE == "multi":
    distributed.initialize(f"localhost:{PORT}", 2, PROCESS_ID)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sparsejax.runs import checkpoint as ckpt_lib  # noqa: E402

CASES = {}


PENDING = set()  # cases run only with WORKER_PENDING=1 (waiting on a fix elsewhere)


def case(group, pending=False):
    def register(fn):
        CASES.setdefault(group, []).append(fn)
        if pending:
            PENDING.add(fn.__name__)
        return fn
    return register


def mesh(shape):
    auto = (jax.sharding.AxisType.Auto,) * 2  # JAX 0.10 defaults to Explicit axes
    return jax.make_mesh(shape, ("data", "fsdp"), axis_types=auto)


def put(x, sharding):
    """A global array from the same host value on every process."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def gather(x):
    from sparsejax.models.hf_io import host_array
    return host_array(x) if isinstance(x, jax.Array) else np.asarray(x)


def host_tree(seed):
    """Fresh random values of several dtypes, a zero-size leaf and a scalar."""
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((16, 24)).astype(np.float32),
            "b16": rng.standard_normal((8, 16)).astype(ml_dtypes.bfloat16),
            "idx": rng.integers(0, 1 << 30, (32, 3)).astype(np.int32),
            "flags": rng.random(40) < 0.5,
            "small": rng.integers(-100, 100, 16).astype(np.int8),
            "frozen": np.zeros((0,), np.int32),
            "step": np.asarray(seed, np.int64)}


def shardings(m):
    """Layouts of the :func:`host_tree` leaves on mesh ``m`` (None: numpy leaf)."""
    fsdp = NamedSharding(m, P("fsdp"))
    return {"w": NamedSharding(m, P("fsdp", None)), "b16": NamedSharding(m, P(None, "fsdp")),
            "idx": NamedSharding(m, P(("data", "fsdp"), None)), "flags": fsdp,
            "small": NamedSharding(m, P()), "frozen": NamedSharding(m, P()), "step": None}


def placed(host, layout):
    return {k: v if layout[k] is None else put(v, layout[k]) for k, v in host.items()}


def assert_tree_equal(got, want):
    for k in want:
        a, b = gather(got[k]), np.asarray(want[k])
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, a.shape, b.dtype, b.shape)
        assert a.tobytes() == b.tobytes(), f"{k} differs"


# ---------------------------------------------------------------------- one process, 8 devices


@case("single")
def fingerprints_do_not_depend_on_layout():
    host = host_tree(1)
    want = ckpt_lib.fingerprints(host)
    for shape in ((2, 4), (1, 8), (8, 1)):
        got = ckpt_lib.fingerprints(placed(host, shardings(mesh(shape))))
        assert got == want, (shape, got, want)
    one = ckpt_lib.fingerprints(jax.tree.map(jnp.asarray, {k: v for k, v in host.items()
                                                           if k != "step"}))
    assert all(one[k] == want[k] for k in one)


@case("single")
def fingerprints_see_one_bit_and_a_swap():
    host = host_tree(2)
    base = ckpt_lib.fingerprints(host)
    for key in ("w", "b16", "idx", "small"):
        flipped = {**host, key: host[key].copy()}
        flat = flipped[key].reshape(-1).view(np.uint8)
        flat[len(flat) // 2] ^= 1
        assert ckpt_lib.fingerprints(flipped)[f"['{key}']"] != base[f"['{key}']"], key
    swapped = {**host, "w": host["w"].copy()}
    swapped["w"][[0, 1]] = swapped["w"][[1, 0]]
    assert ckpt_lib.fingerprints(swapped)["['w']"] != base["['w']"]
    m = mesh((2, 4))
    on_mesh = ckpt_lib.fingerprints({"w": put(swapped["w"], NamedSharding(m, P("fsdp")))})
    assert on_mesh["['w']"] == ckpt_lib.fingerprints(swapped)["['w']"]


@case("single")
def checkpoint_on_2x4_restores_on_1x8_and_one_device_bit_exact():
    host = host_tree(3)
    mgr = ckpt_lib.CheckpointManager(OUT / "reshard", keep=3)
    mgr.save(1, placed(host, shardings(mesh((2, 4)))), identity={"config": {"seed": 0}})
    manifest = mgr.manifest(1)
    assert manifest["format"] == 2 and manifest["tensors"]["['w']"] == [[16, 24], "float32"]
    for shape in ((1, 8), (8, 1)):
        layout = shardings(mesh(shape))
        got = mgr.restore(1, placed(host_tree(99), layout))
        assert_tree_equal(got, host)
        for k, s in layout.items():
            if s is not None:
                assert got[k].sharding == s, (k, got[k].sharding, s)
    one = jax.devices()[0]
    got = mgr.restore(1, {k: v if k == "step" else jax.device_put(v, one)
                          for k, v in host_tree(98).items()})
    assert_tree_equal(got, host)
    assert got["w"].sharding.device_set == {one} and got["frozen"].shape == (0,)
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=layout[k])
                for k, v in host.items()}
    assert_tree_equal(mgr.restore(1, abstract), host)


@case("single")
def corrupted_sharded_checkpoint_is_detected_and_skipped():
    host, older = host_tree(4), host_tree(5)
    m = mesh((2, 4))
    mgr = ckpt_lib.CheckpointManager(OUT / "damage", keep=3)
    mgr.save(1, placed(older, shardings(m)))
    mgr.save(2, placed(host, shardings(m)))
    # The stored bytes of the shards (ocdbt data files): flip a few in each.
    for target in (OUT / "damage" / "2" / "state").rglob("*"):
        if target.is_file() and target.parent.name == "d" and target.stat().st_size > 1000:
            data = bytearray(target.read_bytes())
            i = len(data) // 2
            data[i:i + 4] = bytes(b ^ 0xFF for b in data[i:i + 4])
            target.write_bytes(bytes(data))
    said = []
    step, got = mgr.restore_latest(placed(host_tree(0), shardings(mesh((1, 8)))),
                                   report=said.append)
    assert step == 1 and len(said) == 1 and "damaged" in said[0], said
    assert_tree_equal(got, older)
    # Whole, readable state of other values under checkpoint 2's manifest: only the
    # checksums can tell.
    mgr.save(3, placed(host, shardings(m)))
    (OUT / "damage" / "3" / "state").rename(OUT / "damage" / "3" / "good")
    mgr.save(4, placed(host_tree(6), shardings(m)))
    os.replace(OUT / "damage" / "4" / "state", OUT / "damage" / "3" / "state")
    try:
        mgr.restore(3, placed(host_tree(0), shardings(mesh((1, 8)))))
        raise AssertionError("a swapped state was returned")
    except ckpt_lib.CheckpointError as e:
        assert "checksum of ['" in str(e) and "differs" in str(e), e


@case("single")
def unreshardable_checkpoint_names_the_tensor():
    m = mesh((2, 4))
    mgr = ckpt_lib.CheckpointManager(OUT / "bad", keep=3)
    tree = {"w": put(np.arange(48, dtype=np.float32).reshape(6, 8), NamedSharding(m, P("data")))}
    mgr.save(1, tree)
    errors = []
    for like in ({"w": jax.ShapeDtypeStruct((6, 8), np.float32,
                                            sharding=NamedSharding(mesh((1, 8)), P(None, "fsdp")))},
                 {"w": jax.ShapeDtypeStruct((6, 8), np.float32,
                                            sharding=NamedSharding(m, P("fsdp")))},
                 {"w": jax.ShapeDtypeStruct((6, 4), np.float32)},
                 {"w": jax.ShapeDtypeStruct((6, 8), jnp.bfloat16)},
                 {"w": tree["w"], "extra": np.zeros(3, np.float32)}):
        try:
            mgr.restore(1, like)
            errors.append(None)
        except ckpt_lib.ReshardError as e:
            errors.append(str(e))
    assert errors[0] is None, errors  # (1 x 8), split along the 8 columns: fits
    assert all(e and "\n" not in e for e in errors[1:]), errors
    assert "tensor ['w'] of shape (6, 8) cannot be split 4 ways over mesh axis fsdp" in errors[1]
    assert "tensor ['w'] was saved as float32(6, 8), the run expects float32(6, 4)" in errors[2]
    assert "bfloat16" in errors[3] and "['extra']" in errors[4], errors


@case("single")
def checkpoint_of_two_processes_restores_in_one():
    """The checkpoint the "multi" group wrote (2 processes, mesh 2 x 4) read back by one
    process on 8 devices and on one device (run after that group)."""
    mgr = ckpt_lib.CheckpointManager(OUT / "mp_ckpt")
    assert mgr.complete_steps() == [1, 2], mgr.complete_steps()
    assert_tree_equal(mgr.restore(1, placed(host_tree(0), shardings(mesh((1, 8))))),
                      host_tree(11))
    one = jax.devices()[0]
    got = mgr.restore(2, {k: v if k == "step" else jax.device_put(v, one)
                          for k, v in host_tree(0).items()})
    assert_tree_equal(got, host_tree(12))


# ---------------------------------------------------------------------- 2 processes x 4 devices


def multi_dir(name):
    return OUT / name  # the same folder for both processes


@case("multi")
def processes_see_one_global_mesh():
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    assert distributed.is_main() == (PROCESS_ID == 0) and distributed.is_multiprocess()
    x = np.random.default_rng(7).standard_normal((64, 16)).astype(np.float32)
    m = mesh((2, 4))
    a = put(x, NamedSharding(m, P(("data", "fsdp"), None)))
    w = put(x[:16], NamedSharding(m, P("fsdp", None)))

    @jax.jit
    def step(a, w):  # a data-parallel gradient step: the batch split over all 8 devices
        g = jax.grad(lambda w: jnp.mean((a @ w.T) ** 2))(w)
        return w - 0.1 * g

    got = gather(step(a, w))
    want = x[:16] - 0.1 * (2 * (x @ x[:16].T).T @ x / x.size * 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@case("multi")
def two_processes_write_and_verify_one_sharded_checkpoint():
    host = host_tree(11)
    mgr = ckpt_lib.CheckpointManager(multi_dir("mp_ckpt"), keep=2)
    mgr.save(1, placed(host, shardings(mesh((2, 4)))), identity={"config": {"seed": 0}})
    mgr.save(2, placed(host_tree(12), shardings(mesh((2, 4)))))
    names = os.listdir(multi_dir("mp_ckpt") / "1" / "state")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(names), names  # each its own shards
    got = mgr.restore(1, placed(host_tree(0), shardings(mesh((1, 8)))))
    assert_tree_equal(got, host)
    assert mgr.restore_latest(placed(host_tree(0), shardings(mesh((8, 1)))))[0] == 2


@case("multi")
def process_zero_alone_writes_run_outputs():
    from sparsejax.runs import run_dir
    from sparsejax.runs.metric_writers import create_writer
    from sparsejax.runs.reporting import MetricsLog
    out = multi_dir("mp_run")
    run_dir.lock(out)
    assert os.path.exists(out / run_dir.lock_name())
    run_dir.refuse_earlier_run(out)
    log = MetricsLog(out / "metrics.jsonl")
    log.write({"kind": "train", "step": 1, "loss": float(PROCESS_ID) + 1.0})
    writer = create_writer("jsonl", out, jsonl_name="writer.jsonl")
    writer.write_scalars(1, {"x": 1.0})
    writer.close()
    run_dir.mark_finished(out, 1)
    distributed.barrier("outputs-written")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"kind": "train", "step": 1, "loss": 1.0}], rows  # process 0's line only
    assert len((out / "writer.jsonl").read_text().splitlines()) == 1
    assert run_dir.finished_step(out) == 1
    locks = sorted(n for n in os.listdir(out) if n.startswith(".lock"))
    assert locks == [".lock", ".lock.1"], locks


@case("multi")
def final_model_is_gathered_to_process_zero():
    from flax import nnx

    from sparsejax.models import DecoderConfig, init_model, load_hf, save_hf
    config = DecoderConfig(model_type="qwen2", vocab_size=64, hidden_size=16,
                           intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                           head_dim=8, qkv_bias=True, tie_word_embeddings=True,
                           param_dtype="float32")
    graphdef, params = nnx.split(init_model(config, seed=3))
    m = mesh((2, 4))

    def shard(x):
        x = np.asarray(x)
        spec = P("fsdp") if x.ndim and x.shape[0] % 4 == 0 else P()
        return put(x, NamedSharding(m, spec))

    sharded = jax.tree.map(shard, params)
    assert any(not x.is_fully_addressable for x in jax.tree.leaves(sharded))
    folder = multi_dir("mp_model")
    save_hf(nnx.merge(graphdef, sharded), folder)
    distributed.barrier("model-written")
    assert os.path.isfile(folder / "model.safetensors")
    _, back = nnx.split(load_hf(str(folder)))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


# ---------------------------------------------------------------------- the GRPO trainer on a mesh

_TOKENIZER = []


def tokenizer():
    if not _TOKENIZER:
        from transformers import AutoTokenizer

        from tiny_models import QWEN_TOKENIZER
        _TOKENIZER.append(AutoTokenizer.from_pretrained(QWEN_TOKENIZER))
    return _TOKENIZER[0]


def distinct_chars_reward(completions, answers):
    del answers
    return [len(set(c)) / 8.0 for c in completions]


def grpo_run(out_dir, steps, run_mesh, *, resume=False, final_model=False):
    """A 2-layer random Qwen2 trained by GRPO (float32, 90% sparse, row-balanced mask) on
    ``run_mesh``; returns the trainer after ``train``."""
    from flax import nnx

    from sparsejax.models import DecoderConfig, init_model
    from sparsejax.trainers import GRPOConfig, GRPOTrainer, TrainableConfig
    tok = tokenizer()
    config = DecoderConfig(model_type="qwen2", vocab_size=len(tok), hidden_size=16,
                           intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                           head_dim=8, qkv_bias=True, tie_word_embeddings=True,
                           param_dtype="float32")
    graphdef, params = nnx.split(init_model(config, seed=0))
    cfg = GRPOConfig(steps=steps, prompts_per_step=8, num_generations=2, max_new_tokens=4,
                     micro_batch_size=8, generation_batch_size=16, save_every=1,
                     eval_every=0, beta=0.05)
    sparse = TrainableConfig(sparsity=0.9, learning_rate=1e-2, weight_decay=0.1,
                          mask_strategy="row_balanced")
    trainer = GRPOTrainer(graphdef, params, tok, distinct_chars_reward, cfg, sparse,
                          out_dir, mesh=run_mesh)
    prompts = [tok(q)["input_ids"] for q in ("1+1=", "two plus three", "4*2?", "9-3",
                                              "half of 8", "7+0", "3*3", "ten minus 1")]
    trainer.train(prompts, [str(i) for i in range(8)], resume=resume, progress=False,
                  final_model_dir=(os.path.join(out_dir, "final_model") if final_model
                                   else None))
    return trainer


def one_device_mesh():
    return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))


def assert_close(got, want, rtol=1e-5, atol=1e-5):
    """``||got - want|| / ||want||`` over the whole tree (Frobenius) <= ``rtol`` and every
    entry within ``atol`` (the measure of tests/test_sharded_training.py)."""
    a = [gather(x).astype(np.float64).ravel() for x in jax.tree.leaves(got)]
    b = [gather(x).astype(np.float64).ravel() for x in jax.tree.leaves(want)]
    diff = np.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b)))
    norm = np.sqrt(sum(float(np.sum(y ** 2)) for y in b))
    worst = max((float(np.max(np.abs(x - y))) for x, y in zip(a, b) if y.size), default=0.0)
    assert len(a) == len(b) and diff <= rtol * norm and worst <= atol, (diff / norm, worst)


@case("trainer")
def grpo_checkpoint_on_2x4_resumes_on_1x8_and_one_device():
    """3 uninterrupted steps on (2 x 4) == 1 step on (2 x 4), then 2 more after a
    resume on (1 x 8), or on one device (float32, 1e-5 relative)."""
    import shutil
    ref = grpo_run(OUT / "grpo_ref", 3, mesh((2, 4)))
    part = grpo_run(OUT / "grpo_part", 1, mesh((2, 4)))
    moved = max(float(np.max(np.abs(gather(a) - gather(b)))) for a, b in
                zip(jax.tree.leaves(ref.params), jax.tree.leaves(part.params)))
    assert moved > 1e-4, "steps 2 and 3 did not move the params: the check would be vacuous"
    for name, run_mesh in (("grpo_1x8", mesh((1, 8))), ("grpo_1dev", one_device_mesh())):
        shutil.copytree(OUT / "grpo_part", OUT / name)
        resumed = grpo_run(OUT / name, 3, run_mesh, resume=True)
        assert resumed.step == 3
        assert_close(resumed.params, ref.params)


@case("single")
def grpo_two_processes_equal_one():
    """The final model of the "multi" group's 2-process run equals this process's."""
    from safetensors.numpy import load_file
    two = load_file(OUT / "grpo_mp" / "final_model" / "model.safetensors")
    grpo_run(OUT / "grpo_sp", 2, mesh((2, 4)), final_model=True)
    one = load_file(OUT / "grpo_sp" / "final_model" / "model.safetensors")
    assert two.keys() == one.keys()
    assert_close([two[k] for k in sorted(two)], [one[k] for k in sorted(one)])


@case("multi")
def grpo_runs_on_two_processes():
    out = multi_dir("grpo_mp")
    trainer = grpo_run(out, 2, mesh((2, 4)), final_model=True)
    assert trainer.step == 2
    distributed.barrier("grpo-written")
    assert (out / "final_model" / "model.safetensors").is_file()
    assert (out / "finished.json").is_file() and (out / "checkpoints" / "2" / "manifest.json").is_file()
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in r for r in rows) == 2, rows  # process 0's records only


def main() -> None:
    only = os.environ.get("WORKER_CASES")  # comma-separated names (debugging)
    for fn in CASES[MODE]:
        if only and fn.__name__ not in only.split(","):
            continue
        if fn.__name__ in PENDING and not (only or os.environ.get("WORKER_PENDING")):
            continue
        try:
            fn()
            result = {"case": fn.__name__, "ok": True, "error": ""}
        except Exception as e:
            lines = traceback.format_exc().strip().splitlines()
            ours = [l.strip() for l in lines if "/sparsejax/" in l or "/tests/" in l][-4:]
            result = {"case": fn.__name__, "ok": False,
                      "error": f"{type(e).__name__}: {str(e)[:300]} | at {' / '.join(ours)}"}
        if MODE != "multi" or PROCESS_ID == 0 or not result["ok"]:
            print("CASE " + json.dumps(result), flush=True)
        distributed.barrier(f"case-{fn.__name__}")


if __name__ == "__main__":
    main()
