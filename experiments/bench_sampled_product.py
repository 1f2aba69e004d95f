"""Benchmark: the sparse backward's sampled product alone, every implementation side by side.

For the weight shapes of one Qwen2.5-0.5B layer and its tied output matrix (or your
own), random active entries at a density and ``T`` tokens of random float32 inputs, one
process times (median of ``--repeats`` after a warm-up, each jitted):

* ``dense``: the dense weight gradient ``x^T dy`` (what the sparse backward avoids);
* ``xla``: :func:`sparsejax.backends.xla_sampled_product` (XLA's gather);
* ``cpu_kernel``: the C++ kernel (:mod:`sparsejax.kernels.cpu_sampled_product`), when it builds;
* ``pallas``: the Triton kernel, on an NVIDIA GPU.

Checks every result against the XLA one (max relative error) and writes JSON with
device, versions, date, commit and command to ``--out`` (default under
``runs/benchmarks/``).

    python experiments/bench_sampled_product.py                    # 1%, 2048 tokens
    python experiments/bench_sampled_product.py --density 0.001 --tokens 4096
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_optimizer import write_result
from tqdm import tqdm

from sparsejax import backends
from sparsejax.kernels import cpu_sampled_product
from sparsejax.runs import provenance

SHAPES = {"q_proj 896x896": (896, 896), "k_proj 896x128": (896, 128),
          "up_proj 896x4864": (896, 4864), "down_proj 4864x896": (4864, 896),
          "tied output 896x16384": (896, 16384)}


def implementations() -> dict:
    impls = {"dense": lambda x, dy, a, b: x.T @ dy,
             "xla": lambda x, dy, a, b: backends.xla_sampled_product(x.T, dy.T, a, b)}
    if jax.default_backend() == "cpu" and cpu_sampled_product.available():
        impls["cpu_kernel"] = cpu_sampled_product.sampled_product
    if backends.on_nvidia_gpu():
        impls["pallas"] = backends.sampled_product_fn("pallas")
    return impls


def time_ms(f, args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--density", type=float, default=0.01, help="active / all entries")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the micro-batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default "
                        "runs/benchmarks/bench_sampled_product_<device>.json)")
    args = parser.parse_args(argv)
    if not 0.0 < args.density <= 1.0:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be >= 1")

    rng = np.random.default_rng(args.seed)
    impls = implementations()
    rows = []
    for name, (n_in, n_out) in tqdm(SHAPES.items(), desc="shapes", file=sys.stderr):
        k = max(1, int(args.density * n_in * n_out))
        flat = np.sort(rng.choice(n_in * n_out, k, replace=False))
        a, b = (jnp.asarray(c.astype(np.int32)) for c in np.divmod(flat, n_out))
        x = jnp.asarray(rng.normal(size=(args.tokens, n_in)), jnp.float32)
        dy = jnp.asarray(rng.normal(size=(args.tokens, n_out)), jnp.float32)
        jitted = {m: jax.jit(f) for m, f in impls.items()}
        want = np.asarray(jitted["xla"](x, dy, a, b), np.float64)
        row = {"kernel": name, "in": n_in, "out": n_out, "k": k, "ms": {}, "max_rel_err": {}}
        for m, f in jitted.items():
            row["ms"][m] = time_ms(f, (x, dy, a, b), args.repeats)
            if m != "dense":
                got = np.asarray(f(x, dy, a, b), np.float64)
                row["max_rel_err"][m] = float(np.max(np.abs(got - want))
                                              / max(np.max(np.abs(want)), 1e-30))
        rows.append(row)

    methods = list(impls)
    head = f"{'kernel':<24}{'k':>10}" + "".join(f"{m + ' ms':>15}" for m in methods)
    if "cpu_kernel" in impls:
        head += f"{'xla/kernel':>12}"
    print(f"{args.tokens} tokens, density {args.density:.2%}, float32, "
          f"{jax.devices()[0].device_kind}")
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['kernel']:<24}{r['k']:>10,}" + "".join(f"{r['ms'][m]:>15.2f}"
                                                          for m in methods)
        if "cpu_kernel" in impls:
            line += f"{r['ms']['xla'] / r['ms']['cpu_kernel']:>11.1f}x"
        print(line)
    device = jax.devices()[0]
    record = {
        "benchmark": "bench_sampled_product",
        "device": f"{device.platform}:{device.device_kind}",
        "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": provenance.git_commit(short=True),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "load_average": os.getloadavg(), "args": vars(args), "results": rows,
    }
    write_result(record, args.out, "bench_sampled_product")
    return 0


if __name__ == "__main__":
    sys.exit(main())
