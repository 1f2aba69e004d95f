"""Benchmark: dense optax.adamw vs sparse AdamW (optax transform and fused step).

For a tree of parameter shapes (a model preset, random values) and a list of
densities, times one optimizer step of each method side by side in one process on
the same data, and prints a table of ms/step, speedup over dense AdamW and state
bytes. Results go to a JSON file (``--out``, default under ``runs/benchmarks/``) with the device,
versions, date, commit and command.

    python experiments/bench_optimizer.py                       # CPU-sized default
    python experiments/bench_optimizer.py --preset Qwen2.5-1.5B Llama-3.1-8B \\
        --backends xla pallas --dtype bfloat16                   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import resource
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
from sparsejax.optim.sparse import gather
from sparsejax.runs import provenance

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
    from flax import nnx

    from sparsejax.models import config as model_config
    from sparsejax.models.decoder import init_model
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
    """The trainers' optimizer step (``Trainable.apply``: clipping, skip-on-non-finite and
    master values for bf16 params) on compressed float32 gradients: compile seconds and
    ms/step, and its distance to the same step taken without the skip guard."""
    from sparsejax.config import TrainableConfig
    from sparsejax.trainable import build_trainable
    cfg = TrainableConfig(sparsity=1.0 - density, mask_strategy=args.strategy, max_grad_norm=1.0,
                       backend=args.backends[0])
    trainable = build_trainable(cfg, shapes)
    state = trainable.init(params)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), compressed)
    compile_s = compile_seconds(type(trainable).apply, trainable, params, grads, state)
    run = lambda carry, g_: type(trainable).apply(trainable, carry[0], g_, carry[1])[:2]
    copy = lambda t: jax.tree.map(jnp.copy, t)
    ms = time_steps(run, (copy(params), copy(state)), grads, args.steps, args.warmup)
    # The same numbers as the plain fused step after clipping (the skip guard changes
    # nothing on a finite gradient).
    got, _, _ = type(trainable).apply(trainable, copy(params), grads, copy(state))
    norm = optax.global_norm(grads)
    clipped = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / norm), grads)
    plain = sj.fused_sparse_adamw(trainable.mask, trainable.schedule, weight_decay=cfg.weight_decay,
                                  master_weights=state.master is not None,
                                  backend=cfg.backend)
    ref, _, _ = plain.step(copy(params), clipped, plain.init(params))
    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
    return dict(preset=None, params=n, density=density, k=k,
                method="trainer step (clip+skip+master)", backend=cfg.backend, ms=ms,
                speedup=dense_ms / ms, state_bytes=nbytes(state), **compile_s,
                max_abs_diff_vs_plain_step=diff)


def cond_guarded(inner, max_grad_norm):
    """The skip guard of earlier releases, for comparison: clipping, then one
    ``lax.cond`` around ``inner``'s unguarded, unclipped step (jitted, donated)."""
    from sparsejax.optim.sparse import all_finite, clip_compressed

    def update(params, grads, state):
        g, _ = clip_compressed(grads, max_grad_norm)
        skip = lambda p, g_, st: (p, st._replace(skipped=st.skipped + 1))
        return jax.lax.cond(all_finite(g), lambda p, g_, st: inner.update(p, g_, st)[:2],
                            skip, params, g, state)

    return jax.jit(update, donate_argnums=(0, 2))


def _bits(tree) -> list[np.ndarray]:
    return [np.atleast_1d(np.array(x)).view(np.uint8) for x in jax.tree.leaves(tree)]  # copies


def guard_rows(kind, params, grads, make, args, interleave: bool = True):
    """Skip guards side by side on the same data: no guard, the old ``lax.cond`` guard
    and the library's guard (``skip_nonfinite=True``), each clipping at norm 1 with
    master values. Compile seconds, ms/step, the fraction of param buffers the donated
    step kept in place, and whether a skipped step (a NaN at an active entry) returned
    params and state bit for bit. With ``interleave`` the variants are timed in
    alternating rounds (a busy machine slows all alike; needs all three states in
    memory), else one after another. ``make(**kw)`` builds the optimizer."""
    plain = make(skip_nonfinite=False, max_grad_norm=1.0)
    variants = {"no guard": plain.step,
                "cond guard (old)": cond_guarded(make(skip_nonfinite=False), 1.0),
                "select guard": make(skip_nonfinite=True, max_grad_norm=1.0).step}
    copy = lambda t: jax.tree.map(jnp.copy, t)
    rows = {name: dict(method=f"{kind}: {name}") for name in variants}
    carries, times = {}, {name: [] for name in variants}

    def start(name):
        state = plain.init(params)
        rows[name].update(compile_seconds(variants[name], params, grads, state))
        carries[name] = variants[name](copy(params), grads, state)[:2]  # warm-up
        jax.block_until_ready(carries[name])

    def timed(name):
        leaves = lambda: [x.unsafe_buffer_pointer() for x in jax.tree.leaves(carries[name][0])]
        before, t0 = leaves(), time.perf_counter()
        carries[name] = variants[name](carries[name][0], grads, carries[name][1])[:2]
        jax.block_until_ready(carries[name])
        times[name].append(time.perf_counter() - t0)
        rows[name]["in_place_fraction"] = float(np.mean([a == b for a, b in
                                                         zip(before, leaves())]))

    leaves, treedef = jax.tree.flatten(grads)
    bad = jax.tree.unflatten(treedef, [leaves[0].reshape(-1).at[0].set(jnp.nan)
                                       .reshape(leaves[0].shape)] + leaves[1:])

    def finish(name):
        rows[name]["ms"] = 1e3 * float(np.median(times[name]))
        if name != "no guard":
            params_in, state_in = carries[name]
            before, skipped = _bits((params_in, state_in)), int(state_in.skipped)
            out_p, out_s = variants[name](params_in, bad, state_in)[:2]
            rows[name]["skipped_counted"] = int(out_s.skipped) == skipped + 1
            after = _bits((out_p, out_s._replace(skipped=jnp.int32(skipped))))
            rows[name]["skip_bit_exact"] = all(np.array_equal(a, b)
                                               for a, b in zip(before, after))
        carries.pop(name)

    if interleave:
        for name in variants:
            start(name)
        for _ in range(args.steps):
            for name in variants:
                timed(name)
        for name in variants:
            finish(name)
    else:
        for name in variants:
            start(name)
            for _ in range(args.steps):
                timed(name)
            finish(name)
    base = rows["no guard"]["ms"]
    for r in rows.values():
        r["ms_vs_no_guard"] = r["ms"] / base
    return list(rows.values())


def guard_bench(preset: str, args, device_kind: str) -> list[dict]:
    """``--guards``: the skip guards of the fused sparse step (at each density) and of
    :func:`sparsejax.optim.dense.dense_adamw`, plus the trainers' step."""
    shapes = param_shapes(preset, jnp.dtype(args.dtype))
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    params = random_tree(shapes, 0)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), random_tree(shapes, 1))
    rows = []
    for density in args.densities:
        mask = jax.tree.map(jnp.asarray, sj.random_mask(shapes, 1.0 - density, seed=0,
                                                        strategy=args.strategy))
        compressed = jax.tree.map(gather, grads, mask)
        make = functools.partial(sj.fused_sparse_adamw, mask, 1e-4, master_weights=True,
                                 backend=args.backends[0])
        for r in guard_rows("fused sparse", params, compressed, make, args):
            rows.append(dict(preset=preset, params=n, density=density,
                             k=sj.num_active(mask), backend=args.backends[0], **r))
        trainer = trainer_step_row(shapes, params, compressed, density, args,
                                   rows[-1]["k"], n, rows[-3]["ms"])
        trainer["ms_vs_no_guard"] = trainer["ms"] / rows[-3]["ms"]
        rows.append({**trainer, "preset": preset})
    if args.guards_dense_preset != "none":
        from sparsejax.optim.dense import dense_adamw
        dense_preset = args.guards_dense_preset or preset
        if dense_preset != preset:
            del params, grads, compressed
            shapes = param_shapes(dense_preset, jnp.dtype(args.dtype))
            n = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
            params = random_tree(shapes, 0)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), random_tree(shapes, 1))
        make = lambda **kw: dense_adamw(1e-4, master_weights=True, **kw)
        for r in guard_rows("dense_adamw", params, grads, make, args, interleave=False):
            rows.append(dict(preset=dense_preset, params=n, density=1.0, k=n, backend="xla",
                             **r))
    for r in rows:
        r["device"] = device_kind
    return rows


def format_guard_table(rows: list[dict]) -> str:
    head = (f"{'preset':<14}{'density':>9}  {'method':<40}{'ms/step':>9}{'vs none':>9}"
            f"{'compile s':>10}{'cpu s':>8}{'in place':>9}{'skip exact':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['preset']:<14}{r['density']:>9.2%}  {r['method']:<40}{r['ms']:>9.1f}"
            f"{r.get('ms_vs_no_guard', math.nan):>8.2f}x{r['compile_s']:>10.1f}"
            f"{r['compile_cpu_s']:>8.1f}{r.get('in_place_fraction', math.nan):>9.2f}"
            f"{str(r.get('skip_bit_exact', '-')):>11}")
    return "\n".join(lines)


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


def write_result(record: dict, out: str | None, stem: str) -> Path:
    """Writes a benchmark's JSON ``record`` to ``out``, by default
    ``runs/benchmarks/<stem>_<device>.json`` (``cpu`` or the GPU's kind; the committed
    results in ``experiments/results/`` are written only when asked); prints and returns
    the path."""
    device = jax.devices()[0]
    slug = device.device_kind.lower().replace(" ", "_") if device.platform != "cpu" else "cpu"
    path = Path(out or Path("runs") / "benchmarks" / f"{stem}_{slug}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


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
    parser.add_argument("--guards", action="store_true",
                        help="instead of the method table: the skip guards side by side (no "
                             "guard, the old lax.cond guard, the library's guard) and the "
                             "trainers' step; default JSON bench_optimizer_guards_<device>.json")
    parser.add_argument("--guards-dense-preset", default=None,
                        help="with --guards, the tree for dense_adamw's guards (float32 "
                             "master values and moments: about 20 bytes per parameter, "
                             "12 GB for Qwen2.5-0.5B); default the --preset, 'none' to skip")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default runs/benchmarks/bench_optimizer_<device>.json)")
    args = parser.parse_args(argv)
    for d in args.densities:
        if not 0.0 < d <= 1.0:
            parser.error(f"densities must be in (0, 1], got {d}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    device = jax.devices()[0]
    device_kind = f"{device.platform}:{device.device_kind}"
    load_at_start = os.getloadavg()
    rows = []
    for preset in tqdm(args.preset, desc="presets", file=sys.stderr):
        try:
            rows += (guard_bench if args.guards else bench_preset)(preset, args, device_kind)
        except KeyError as e:
            parser.error(str(e))
    print((format_guard_table if args.guards else format_table)(rows))
    record = {
        "benchmark": "bench_optimizer",
        "device": device_kind,
        "device_count": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_at_start,
        "load_average": os.getloadavg(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": provenance.git_commit(short=True),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "args": vars(args),
        "results": rows,
    }
    write_result(record, args.out, f"bench_optimizer{'_guards' if args.guards else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
