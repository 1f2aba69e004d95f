"""The parts of ``experiments/gpu_check.py``, each run in its own process.

A part is ``run(ctx)``: it fills ``ctx.result`` (``summary``: one line; ``rows``: dicts for
the report's tables; ``notes``: what it skipped and why) and calls ``ctx.flush()`` after
each measurement, so a part killed at its timeout still leaves what it measured. Parts
that drive another script (``tests``, ``sampler``, ``train_step``) import no JAX
themselves, so the device belongs to that script alone. The ``grpo`` part lives in
``gpu_check_grpo.py``.

The numbers: the optimizer rows' achieved bandwidth counts the bytes of the
touched-sector model of ``kernels/README.md``; the sampler's decode floor is
``bench_sampler.py``'s (params + filled KV cache over the measured read bandwidth).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

# Datasheet HBM bandwidth (GB/s), used only when the env part did not measure one.
DATASHEET_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}
VERSIONED = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
             "jax-cuda12-pjrt", "flax", "optax", "orbax-checkpoint", "chex", "transformers",
             "numpy", "ml-dtypes", "triton", "torch", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12",
             "pytest")


def versions() -> dict:
    """Installed versions of the packages the check depends on (None: not installed)."""
    out = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _median_s(fn, repeats: int) -> float:
    import jax
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------- env


def _cuda_versions() -> dict:
    try:
        from jax._src.lib import cuda_versions
    except ImportError:
        return {}
    if cuda_versions is None:
        return {}
    out = {}
    for name in ("cuda_runtime_get_version", "cuda_runtime_build_version",
                 "cuda_driver_get_version", "cudnn_get_version", "cudnn_build_version",
                 "cublas_get_version", "cufft_get_version", "cusolver_get_version",
                 "cusparse_get_version", "cupti_get_version"):
        fn = getattr(cuda_versions, name, None)
        if fn is not None:
            try:
                out[name.replace("_get_version", "").replace("_version", "_build")] = int(fn())
            except Exception as e:
                out[name] = f"error: {e}"
    return out


def _loaded_cuda_libraries() -> list[str]:
    """Files of the CUDA libraries mapped into this process (two copies of one = trouble)."""
    try:
        text = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    pat = re.compile(r"(/\S*lib(?:cudnn|cublas|cublasLt|cudart|nccl|cusolver|cufft)[^/\s]*)")
    return sorted({m.group(1) for m in pat.finditer(text)})


def _nvidia_smi() -> str | None:
    try:
        run = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.sm,clocks.mem,temperature.gpu,power.draw",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() or run.stderr.strip() or None


def run_env(ctx) -> None:
    """Devices, memory, versions, and the two ceilings (copy bandwidth, bf16 matmul)."""
    import jax
    import jax.numpy as jnp
    res = ctx.result
    res["versions"] = versions()
    devs = jax.devices()
    d = devs[0]
    stats = d.memory_stats() or {}
    res["device"] = {"platform": d.platform, "device_kind": d.device_kind,
                     "count": len(devs), "devices": [str(x) for x in devs],
                     "compute_capability": getattr(d, "compute_capability", None),
                     "memory_bytes_limit": stats.get("bytes_limit"),
                     "default_backend": jax.default_backend()}
    res["cuda"] = _cuda_versions()
    res["nvidia_smi"] = _nvidia_smi()
    ctx.flush()
    gpu = d.platform == "gpu"
    n = (256 if gpu else 4) * 2**20  # float32 elements: 1 GiB on a GPU, 16 MiB on a CPU
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    double = jax.jit(lambda a: a * 2)
    s = _median_s(functools.partial(double, x), 10)
    res["copy_gbps"] = 2 * x.nbytes / s / 1e9  # read + write
    del x
    m = 8192 if gpu else 256
    a = jax.random.normal(jax.random.key(1), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (m, m), jnp.bfloat16)
    s = _median_s(lambda: jnp.dot(a, b), 10)
    res["matmul_bf16_tflops"] = 2 * m**3 / s / 1e12
    ctx.flush()
    if gpu:
        q = jax.random.normal(jax.random.key(3), (2, 128, 8, 64), jnp.bfloat16)
        try:
            out = jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
            res["cudnn_attention"] = f"ran, finite={bool(jnp.isfinite(out).all())}"
        except Exception as e:
            res["cudnn_attention"] = f"failed: {str(e).splitlines()[0][:200]}"
    res["loaded_cuda_libraries"] = _loaded_cuda_libraries()
    cc = res["device"]["compute_capability"]
    gib = (stats.get("bytes_limit") or 0) / 2**30
    res["summary"] = (
        f"{len(devs)} x {d.device_kind}" + (f", cc {cc}" if cc else "")
        + (f", {gib:.1f} GiB usable" if gib else "") + f", jax {jax.__version__}"
        + (f", CUDA {res['cuda'].get('cuda_runtime')}, cuDNN {res['cuda'].get('cudnn')}"
           if res["cuda"] else "")
        + f"; copy {res['copy_gbps']:.3g} GB/s, bf16 matmul {res['matmul_bf16_tflops']:.3g}"
        " TFLOP/s")
    if not gpu:
        res["notes"].append("no GPU: ceilings are this CPU's; cuDNN not probed")


# ----------------------------------------------------------------------------- tests


def gpu_test_files() -> list[Path]:
    """Test files that hold a ``gpu``-marked test (a static scan: nothing is imported)."""
    return sorted(p for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))


def run_tests(ctx) -> None:
    """``pytest -m gpu`` over the files with gpu-marked tests; per-test outcomes."""
    files = gpu_test_files()
    xml = ctx.out / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "-rfEs", f"--junitxml={xml}", *[str(f.relative_to(ROOT)) for f in files]]
    ctx.result["command"] = " ".join(cmd[2:])
    ctx.flush()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    (ctx.out / "pytest_gpu.log").write_text(run.stdout + run.stderr)
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    if xml.exists():
        root = ET.parse(xml).getroot()
        for suite in root.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    msg = (el.get("message") or "").strip().splitlines()
                    failed.append(f"{case.get('classname')}::{case.get('name')}: "
                                  f"{msg[0][:200] if msg else tag}")
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ctx.result.update(counts, passed=passed, failed_tests=failed, exit_code=run.returncode,
                      files=[f.name for f in files])
    ctx.result["summary"] = (f"{passed} passed, {counts['failures']} failed, "
                             f"{counts['errors']} errors, {counts['skipped']} skipped "
                             f"({len(files)} files)")
    if run.returncode not in (0,):
        tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"pytest -m gpu exited {run.returncode}:\n{tail}")
    if passed == 0 and counts["skipped"]:
        ctx.result["status_hint"] = "skipped"
        ctx.result["summary"] += ": every gpu test needs a GPU"


# ----------------------------------------------------------------------------- optimizer


def sectors_per_entry(n: int, k: int, itemsize: int) -> float:
    """Expected distinct 32-byte sectors per active entry, ``k`` uniform of ``n``."""
    if k == 0:
        return 0.0
    e = max(1, 32 // itemsize)
    d = k / n
    return (n / e) * (1.0 - (1.0 - d) ** e) / k


def sector_model_bytes(shapes, ks, *, param_itemsize: int, grad_itemsize: int,
                       master: bool, compressed: bool, mu_itemsize: int = 4) -> float:
    """Bytes one fused step moves by the touched-sector model of ``kernels/README.md``.

    Contiguous per active entry: index 4, ``mu``/``nu`` (and the float32 master) read and
    written, a compressed gradient read. Random: 32 B per touched sector of the parameter
    (written; also read without a master) and of a dense gradient (read).
    """
    total = 0.0
    for shape, k in zip(shapes, ks):
        n = math.prod(shape)
        if not k:
            continue
        contiguous = 4 + 2 * mu_itemsize + 2 * 4 + (8 if master else 0)
        contiguous += grad_itemsize if compressed else 0
        random = 32 * sectors_per_entry(n, k, param_itemsize) * (1 if master else 2)
        if not compressed:
            random += 32 * sectors_per_entry(n, k, grad_itemsize)
        total += k * (contiguous + random)
    return total


def _hbm_gbps(ctx) -> tuple[float | None, str]:
    env = ctx.context.get("env", {})
    if env.get("copy_gbps") and env.get("device", {}).get("platform") == "gpu":
        return env["copy_gbps"], "measured copy"
    kind = env.get("device", {}).get("device_kind", "")
    for name, gbps in DATASHEET_GBPS.items():
        if name in kind:
            return gbps, f"{name} datasheet"
    return env.get("copy_gbps"), "measured copy"


def run_optimizer(ctx) -> None:
    """optax.adamw vs the fused sparse step (xla, pallas per tensor, pallas batched)."""
    import bench_optimizer as bo
    import jax
    import jax.numpy as jnp
    import optax

    import sparsejax as sj
    from sparsejax.optim.sparse import gather

    gpu = jax.devices()[0].platform == "gpu"
    presets = (["synthetic-tiny"] if ctx.tiny else
               ["Qwen2.5-0.5B", "Qwen2.5-1.5B", "Llama-3.1-8B"])
    densities = [0.1] if ctx.tiny else [0.01, 0.001]
    per_launch = 2 if ctx.tiny else 32
    kernel = "pallas" if gpu else "interpret"
    variants = [("xla", 1), (kernel, 1), (kernel, per_launch)]
    if not gpu:
        ctx.result["notes"].append("pallas needs a GPU: the same kernel ran interpreted")
    steps, warmup = (2, 1) if ctx.tiny else (5, 1)
    dtype = jnp.bfloat16
    gbps, gbps_source = _hbm_gbps(ctx)
    ctx.result.update(dtype="bfloat16", steps=steps, hbm_gbps=gbps, hbm_source=gbps_source,
                      method="fused rows: bf16 params, float32 master, compressed grads "
                             "(the trainer's sparse-backward path)")
    rows = ctx.result["rows"]
    copy = lambda t: jax.tree.map(jnp.copy, t)

    def add(row, bytes_moved):
        row["gbps"] = bytes_moved / (row["ms"] * 1e-3) / 1e9 if row.get("ms") else None
        row["model_bytes"] = bytes_moved
        row["fraction_of_hbm"] = row["gbps"] / gbps if row["gbps"] and gbps else None
        rows.append(row)
        ctx.flush()

    for preset in presets:
        shapes = bo.param_shapes(preset, dtype)
        leaves = jax.tree.leaves(shapes)
        n = sum(math.prod(s.shape) for s in leaves)
        params, grads = bo.random_tree(shapes, 0), bo.random_tree(shapes, 1)
        base = dict(preset=preset, params=n)
        try:
            tx = optax.adamw(1e-4)
            state = tx.init(params)
            ms = bo.time_steps(bo.transform_step(tx), (copy(params), state), grads, steps, warmup)
            dense_ms = ms
            moved = 2 * bo.nbytes(params) + bo.nbytes(grads) + 2 * bo.nbytes(state)
            add(dict(base, density=1.0, k=n, method="optax.adamw", backend="xla", ms=ms,
                     speedup=1.0), moved)
            del state
        except Exception as e:
            dense_ms = None
            rows.append(dict(base, density=1.0, method="optax.adamw", backend="xla",
                             error=str(e).splitlines()[0][:300]))
            ctx.flush()
        for density in densities:
            mask = sj.random_mask(shapes, 1.0 - density, seed=0, strategy="per_tensor")
            ks = [int(m.size) for m in jax.tree.leaves(mask)]
            mask = jax.tree.map(jnp.asarray, mask)
            compressed = jax.tree.map(gather, grads, mask)
            moved = sector_model_bytes([s.shape for s in leaves], ks, param_itemsize=2,
                                       grad_itemsize=2, master=True, compressed=True)
            for backend, launch in variants:
                row = dict(base, density=density, k=sum(ks), backend=backend,
                           method=f"fused, {launch}/launch" if launch > 1 else "fused")
                try:
                    fused = sj.fused_sparse_adamw(mask, 1e-4, backend=backend,
                                                  master_weights=True,
                                                  tensors_per_launch=launch)
                    state = fused.init(params)
                    run = lambda c, g, f=fused: f.step(c[0], g, c[1])[:2]
                    row["ms"] = bo.time_steps(run, (copy(params), state), compressed, steps,
                                              warmup)
                    row["speedup"] = dense_ms / row["ms"] if dense_ms else None
                    row["state_bytes"] = bo.nbytes(state)
                    del state
                    add(row, moved)
                except Exception as e:
                    row["error"] = str(e).splitlines()[0][:300]
                    rows.append(row)
                    ctx.flush()
            del mask, compressed
        del params, grads
    ok = [r for r in rows if r.get("ms") and r["method"] != "optax.adamw"]
    best = max(ok, key=lambda r: r["gbps"] or 0, default=None)
    oom = [r for r in rows if re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory", r.get("error", ""))]
    for r in oom:  # a size limit of this card, reported; not a failure of the code
        ctx.result["notes"].append(f"{r['preset']} {r['method']} ({r['backend']}): out of memory")
    errors = sum(1 for r in rows if "error" in r) - len(oom)
    ctx.result["summary"] = (
        f"{len(rows)} rows ({errors} errors)" + (
            f"; best fused {best['gbps']:.3g} GB/s by the sector model"
            + (f" = {100 * best['fraction_of_hbm']:.0f}% of {gbps:.3g} GB/s"
               if best["fraction_of_hbm"] else "")
            + f" ({best['preset']}, {best['density']:.1%}, {best['backend']}, "
              f"{best['method']})" if best else ""))
    if errors:
        raise RuntimeError(f"{errors} optimizer rows failed: " + "; ".join(
            r["error"] for r in rows if "error" in r and r not in oom)[:500])


# ----------------------------------------------------------------------------- scripts


def script_flags(script: Path) -> set[str]:
    """The ``--flags`` a script's ``--help`` lists (an empty set if --help fails)."""
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=False, timeout=120)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", run.stdout)) if run.returncode == 0 else set()


def run_script(ctx, name: str, wanted: list[tuple[tuple[str, ...], str | None]]) -> dict:
    """Runs ``experiments/<name>.py`` with those of ``wanted`` its --help lists.

    ``wanted`` holds ``((flag, alias, ...), value or None)``; a value with spaces is
    several arguments (an ``nargs`` flag); flags the script does not list are left out
    and named in the notes. Returns its JSON record (``--out``).
    """
    script = EXPERIMENTS / f"{name}.py"
    flags = script_flags(script)
    if not flags:
        raise RuntimeError(f"{script.name} --help failed: cannot wire its flags")
    out_json = ctx.out / f"{name}.json"
    argv = []
    for names, value in wanted + [(("--out",), str(out_json))]:
        flag = next((f for f in names if f in flags), None)
        if flag is None:
            ctx.result["notes"].append(f"{script.name} has no {names[0]}: left out")
            continue
        argv += [flag] + (value.split() if value is not None else [])  # "a b": nargs
    cmd = [sys.executable, str(script.relative_to(ROOT)), *argv]
    ctx.result["command"] = "python " + " ".join(cmd[1:])
    ctx.flush()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    (ctx.out / f"{name}.log").write_text(run.stdout + run.stderr)
    ctx.result["stdout_tail"] = run.stdout.strip().splitlines()[-14:]
    if run.returncode != 0:
        tail = "\n".join(run.stderr.strip().splitlines()[-12:])
        raise RuntimeError(f"{script.name} exited {run.returncode}:\n{tail}")
    if not out_json.exists():
        raise RuntimeError(f"{script.name} wrote no {out_json.name} (its table is in the log)")
    return json.loads(out_json.read_text())


def run_sampler(ctx) -> None:
    """bench_sampler.py on Qwen2.5-0.5B shapes: prefill and decode tokens/s vs the floor."""
    if ctx.tiny:
        wanted = [(("--tiny",), None), (("--no-hf",), None)]
    else:
        wanted = [(("--model", "--preset"), "Qwen2.5-0.5B"), (("--dtype",), "bfloat16"),
                  (("--prompts",), "8"), (("--samples",), "8"), (("--new-tokens",), "256"),
                  (("--slots",), "64"), (("--batch-rows",), "64"), (("--no-hf",), None)]
    record = run_script(ctx, "bench_sampler", wanted)
    work = record.get("workload", {})
    prompt_tokens = sum(work.get("prompt_lengths") or [])
    samples = work.get("samples", 1)
    n_params = record.get("num_params")
    tflops = ctx.context.get("env", {}).get("matmul_bf16_tflops")
    ctx.result.update(model=record.get("model"), bandwidth_gbps=record.get("bandwidth_gbps"),
                      workload=work)
    for r in record.get("results", []):
        row = {k: r.get(k) for k in ("label", "sampler", "tokens_per_s", "decode_steps",
                                     "occupancy", "decode_step_ms", "floor_step_ms",
                                     "prefill_s", "compile_s") if k in r}
        if r.get("decode_step_ms") and r.get("floor_step_ms"):
            row["decode_fraction_of_roofline"] = r["floor_step_ms"] / r["decode_step_ms"]
        prefill_tok = r.get("prefill_tokens")
        if prefill_tok is None and prompt_tokens:
            prefill_tok = prompt_tokens * (samples if r.get("sampler") == "batch" else 1)
        if r.get("prefill_s") and prefill_tok:
            row["prefill_tokens_per_s"] = r.get("prefill_tokens_per_s") or (
                prefill_tok / r["prefill_s"])
            if n_params and tflops:
                row["prefill_fraction_of_matmul"] = (
                    2 * n_params * row["prefill_tokens_per_s"] / (tflops * 1e12))
        ctx.result["rows"].append(row)
    best = max(ctx.result["rows"], key=lambda r: r.get("tokens_per_s") or 0, default=None)
    ctx.result["summary"] = "no sampler rows" if best is None else (
        f"best {best.get('label')}: {best.get('tokens_per_s', 0):.0f} tok/s"
        + (f", decode step {best['decode_step_ms']:.2f} ms vs floor "
           f"{best['floor_step_ms']:.2f} ms ({100 * best['decode_fraction_of_roofline']:.0f}%)"
           if best.get("decode_fraction_of_roofline") else "")
        + (f", prefill {best['prefill_tokens_per_s']:.0f} tok/s"
           if best.get("prefill_tokens_per_s") else ""))


def run_train_step(ctx) -> None:
    """bench_train_step.py: dense vs gather vs sparse-backward micro-batch step."""
    if ctx.tiny:
        wanted = [(("--preset",), "tiny"), (("--num-layers",), "0"), (("--vocab",), "0"),
                  (("--length",), "12"), (("--batch",), "2"), (("--densities",), "0.1"),
                  (("--steps",), "1"), (("--warmup",), "0"), (("--backend",), "xla")]
    else:
        wanted = [(("--preset",), "Qwen2.5-0.5B"), (("--num-layers",), "4"),
                  (("--vocab",), "0"), (("--batch",), "8"), (("--length",), "512"),
                  # 10% and 1%: where the sampled product starts to beat the
                  # tensor-core GEMM (sets sparse_grads.AUTO_MAX_DENSITY["gpu"]).
                  (("--densities",), "0.1 0.01"), (("--dtype",), "bfloat16"),
                  (("--steps",), "3"), (("--warmup",), "1")]
    record = run_script(ctx, "bench_train_step", wanted)
    for r in record.get("results", []):
        ctx.result["rows"].append({k: r.get(k) for k in (
            "method", "density", "k", "ms", "speedup_vs_dense", "speedup_vs_gather",
            "peak_bytes", "temp_bytes", "loss")})
    ctx.result["summary"] = ", ".join(
        f"{r['method']}" + ("" if r["method"] == "dense" else f" {r['density']:.1%}")
        + f" {r['ms']:.1f} ms" for r in ctx.result["rows"] if r.get("ms") is not None)


from gpu_check_grpo import run_grpo, run_grpo_step  # noqa: E402,F401
