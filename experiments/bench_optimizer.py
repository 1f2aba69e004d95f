"""Benchmark: dense optax.adamw vs sparse AdamW (optax transform and fused step).

For a tree of parameter shapes (a model preset, random values) and a list of
densities, times one optimizer step of each method side by side in one process on
the same data, and prints a table of ms/step, speedup over dense AdamW and state
bytes. Results go to a JSON file under ``experiments/results/`` with the device,
versions, date, commit and command.

    python experiments/bench_optimizer.py                       # CPU-sized default
    python experiments/bench_optimizer.py --preset Qwen2.5-1.5B Llama-3.1-8B \\
        --backends xla pallas --dtype bfloat16                   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import sparsejax as sj
from sparsejax import backends
from sparsejax.optim import gather

SYNTHETIC = {
    # 10 matrices of 3200 x 3125 = 1e8 parameters: the CPU target's tree.
    "synthetic-100m": {f"w{i}": (3200, 3125) for i in range(10)},
    "synthetic-10m": {f"w{i}": (1000, 1000) for i in range(10)},
    "synthetic-tiny": {"w": (64, 48), "v": (48,), "t": (4, 8, 16)},  # smoke tests
}
DEFAULT_PRESETS_CPU = ["synthetic-100m"]
DEFAULT_PRESETS_GPU = ["Qwen2.5-0.5B", "Qwen2.5-1.5B", "Llama-3.1-8B"]


def param_shapes(preset: str, dtype) -> dict:
    """``{path: ShapeDtypeStruct}`` for a synthetic tree or a model preset's config."""
    if preset in SYNTHETIC:
        return {k: jax.ShapeDtypeStruct(s, dtype) for k, s in SYNTHETIC[preset].items()}
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from sparsejax.models import config as model_config  # pylint: disable=g-import-not-at-top
    from sparsejax.models.decoder import init_model  # pylint: disable=g-import-not-at-top
    cfg = model_config.preset(preset, param_dtype=jnp.dtype(dtype).name)
    abstract = nnx.eval_shape(lambda: init_model(cfg))
    state = nnx.state(abstract, nnx.Param)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), state.to_pure_dict())


def random_tree(shapes, seed: int):
    """Fresh normal values for every leaf (generated on the device, leaf by leaf)."""
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    make = jax.jit(lambda k, s: jax.random.normal(k, s.shape, s.dtype), static_argnums=1)
    return jax.tree.unflatten(treedef, [make(k, s) for k, s in zip(keys, leaves)])


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def time_steps(step, carry, grads, steps: int, warmup: int) -> float:
    """Median wall time in ms of ``carry = step(carry, grads)``, after warm-up (compile)."""
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        carry = step(carry, grads)
        jax.block_until_ready(carry)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def compile_seconds(jitted, *args) -> dict[str, float]:
    """``{"compile_s": wall, "compile_cpu_s": cpu}`` seconds to lower and compile
    ``jitted`` for ``args`` (nothing runs); CPU seconds count every thread of the process
    and are less sensitive to a busy machine than wall seconds."""
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    jitted.lower(*args).compile()
    return {"compile_s": time.perf_counter() - t0,
            "compile_cpu_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime - c0}


def trainer_step_row(shapes, params, compressed, density, args, k, n, dense_ms):
    """The trainers' optimizer step (``Updater.apply``: clipping, skip-on-non-finite and
    master values for bf16 params) on compressed float32 gradients: compile seconds and
    ms/step, and its distance to the same step taken without the skip guard."""
    from sparsejax.trainers.config import SparseConfig  # pylint: disable=g-import-not-at-top
    from sparsejax.trainers.updater import Updater  # pylint: disable=g-import-not-at-top
    cfg = SparseConfig(sparsity=1.0 - density, mask_strategy=args.strategy, max_grad_norm=1.0,
                       backend=args.backends[0])
    updater = Updater(cfg, shapes)
    state = updater.init(params)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), compressed)
    compile_s = compile_seconds(Updater.apply, updater, params, grads, state)
    run = lambda carry, g_: Updater.apply(updater, carry[0], g_, carry[1])[:2]
    copy = lambda t: jax.tree.map(jnp.copy, t)
    ms = time_steps(run, (copy(params), copy(state)), grads, args.steps, args.warmup)
    # The same numbers as the plain fused step after clipping (the skip guard changes
    # nothing on a finite gradient).
    got, _, _ = Updater.apply(updater, copy(params), grads, copy(state))
    norm = optax.global_norm(grads)
    clipped = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / norm), grads)
    plain = sj.fused_sparse_adamw(updater.mask, updater.schedule, weight_decay=cfg.weight_decay,
                                  master_weights=state.master is not None,
                                  backend=cfg.backend)
    ref, _, _ = plain.step(copy(params), clipped, plain.init(params))
    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
    return dict(preset=None, params=n, density=density, k=k,
                method="trainer step (clip+skip+master)", backend=cfg.backend, ms=ms,
                speedup=dense_ms / ms, state_bytes=nbytes(state), **compile_s,
                max_abs_diff_vs_plain_step=diff)


def transform_step(tx):
    """One jitted ``optax`` step over ``(params, state)``, donated so it runs in place."""

    def run(carry, grads):
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(run, donate_argnums=0)


def bench_preset(preset: str, args, device_kind: str) -> list[dict]:
    shapes = param_shapes(preset, jnp.dtype(args.dtype))
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    rows = []
    params = random_tree(shapes, 0)
    grads = random_tree(shapes, 1)
    dense_tx = optax.adamw(1e-4)
    dense_state = dense_tx.init(params)
    dense_state_bytes = nbytes(dense_state)
    copy = lambda t: jax.tree.map(jnp.copy, t)
    dense_step = transform_step(dense_tx)
    dense_compile = compile_seconds(dense_step, (params, dense_state), grads)
    dense_ms = time_steps(dense_step, (copy(params), dense_state), grads,
                          args.steps, args.warmup)
    del dense_state
    rows.append(dict(preset=preset, params=n, density=1.0, k=n, method="optax.adamw",
                     backend="xla", ms=dense_ms, speedup=1.0, state_bytes=dense_state_bytes,
                     **dense_compile))
    for density in args.densities:
        mask = sj.random_mask(shapes, 1.0 - density, seed=0, strategy=args.strategy)
        k = sj.num_active(mask)
        mask = jax.tree.map(jnp.asarray, mask)
        tx = sj.sparse_adamw(mask, 1e-4, backend="xla")
        state = tx.init(params)
        ms = time_steps(transform_step(tx), (copy(params), state), grads, args.steps, args.warmup)
        rows.append(dict(preset=preset, params=n, density=density, k=k,
                         method="sparse_adamw (optax)", backend="xla", ms=ms,
                         speedup=dense_ms / ms, state_bytes=nbytes(state)))
        compressed = jax.tree.map(gather, grads, mask)
        for backend in args.backends:
            # The fused step as a trainer uses it: dense gradients (gathered inside the
            # step), gradients already compressed to the k entries (a trainer gathers them
            # inside its backward pass), and with float32 master values (read
            # contiguously instead of gathered from the params).
            variants = [("fused", False, grads, 1),
                        ("fused, compressed grads", False, compressed, 1),
                        ("fused, compressed + master", True, compressed, 1)]
            if backend != "xla":  # the kernel can also step many tensors per launch
                variants.append((f"fused, compressed, {args.tensors_per_launch}/launch", False,
                                 compressed, args.tensors_per_launch))
            for method, master, g, per_launch in variants:
                fused = sj.fused_sparse_adamw(mask, 1e-4, backend=backend,
                                              master_weights=master,
                                              tensors_per_launch=per_launch)
                state = fused.init(params)
                compile_s = compile_seconds(fused.step, params, g, state)
                run = lambda carry, g_, f=fused: f.step(carry[0], g_, carry[1])[:2]
                ms = time_steps(run, (copy(params), state), g, args.steps, args.warmup)
                rows.append(dict(preset=preset, params=n, density=density, k=k,
                                 method=method, backend=backend, ms=ms,
                                 speedup=dense_ms / ms, state_bytes=nbytes(state),
                                 **compile_s))
        if args.trainer_step:
            rows.append({**trainer_step_row(shapes, params, compressed, density, args, k, n,
                                            dense_ms), "preset": preset})
    for r in rows:
        r["state_fraction_of_dense"] = r["state_bytes"] / dense_state_bytes
        r["device"] = device_kind
    return rows


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_table(rows: list[dict]) -> str:
    head = (f"{'preset':<16}{'params':>13}{'density':>10}{'k':>12}  {'method':<34}"
            f"{'backend':<10}{'ms/step':>10}{'speedup':>9}{'compile s':>10}{'cpu s':>9}"
            f"{'state MB':>10}"
            f"{'state/dense':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['preset']:<16}{r['params']:>13,}{r['density']:>10.4%}{r['k']:>12,}  "
            f"{r['method']:<34}{r['backend']:<10}{r['ms']:>10.2f}{r['speedup']:>8.1f}x"
            f"{r.get('compile_s', math.nan):>10.1f}{r.get('compile_cpu_s', math.nan):>9.1f}"
            f"{r['state_bytes'] / 2**20:>10.1f}{r['state_fraction_of_dense']:>12.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    on_gpu = backends.on_nvidia_gpu()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", nargs="+",
                        default=DEFAULT_PRESETS_GPU if on_gpu else DEFAULT_PRESETS_CPU,
                        help=f"trees to time: {sorted(SYNTHETIC)} or a model preset "
                             "(Qwen2.5-0.5B, Qwen2.5-1.5B, Llama-3.1-8B, ...)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.001, 0.0001],
                        help="fractions of entries trained")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--strategy", default="per_tensor",
                        choices=["per_tensor", "global", "row_balanced"])
    parser.add_argument("--backends", nargs="+",
                        default=["xla", "pallas"] if on_gpu else ["xla"],
                        choices=["xla", "pallas", "interpret"],
                        help="backends of the fused step")
    parser.add_argument("--tensors-per-launch", type=int, default=32,
                        help="tensors per kernel launch in the batched pallas row")
    parser.add_argument("--trainer-step", action=argparse.BooleanOptionalAction, default=True,
                        help="also time (and compile) the trainers' optimizer step: clipping, "
                             "skip-on-non-finite, master values")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default experiments/results/bench_optimizer_<device>.json)")
    args = parser.parse_args(argv)
    for d in args.densities:
        if not 0.0 < d <= 1.0:
            parser.error(f"densities must be in (0, 1], got {d}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    device = jax.devices()[0]
    device_kind = f"{device.platform}:{device.device_kind}"
    rows = []
    for preset in tqdm(args.preset, desc="presets", file=sys.stderr):
        try:
            rows += bench_preset(preset, args, device_kind)
        except KeyError as e:
            parser.error(str(e))
    print(format_table(rows))
    record = {
        "benchmark": "bench_optimizer",
        "device": device_kind,
        "device_count": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "args": vars(args),
        "results": rows,
    }
    slug = device.device_kind.lower().replace(" ", "_") if device.platform != "cpu" else "cpu"
    out = Path(args.out or Path(__file__).resolve().parent / "results"
               / f"bench_optimizer_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
