"""Benchmark: one training micro-batch (forward + backward + optimizer step), three ways.

On a model-shaped decoder (a preset's layer shapes, fewer layers and a smaller
vocabulary on a CPU) and the same random batch, side by side in one process:

* ``dense``: dense backward + ``optax.adamw`` (full finetuning);
* ``gather``: dense backward, gather of the active entries, fused sparse AdamW
  (the sparse path before the sparse backward: ``--sparse-grads off``);
* ``sparse``: sparse backward (gradients only at the active entries, no dense weight
  gradient) + fused sparse AdamW (``--sparse-grads on``).

All methods are compiled first and then timed round-robin (one step of each per
round), so the machine's load changes hit them alike. Prints ms/step (median), ratios and the compiled memory of each
(``compiled.memory_analysis()``: temporaries and peak), one row per density, and
writes JSON with device, versions, date, commit and command under
``--out`` (default under ``runs/benchmarks/``).

    python experiments/bench_train_step.py                   # CPU: 2 layers of Qwen2.5-0.5B
    python experiments/bench_train_step.py --preset tiny --steps 1 --warmup 1   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_optimizer import write_result
from flax import nnx
from tqdm import tqdm

from sparsejax import backends, masks
from sparsejax import sparse_backward as sparse_grads
from sparsejax.models import config as model_config
from sparsejax.models.decoder import init_model
from sparsejax.models.logprobs import token_logprobs
from sparsejax.optim.sparse import fused_sparse_adamw, gather
from sparsejax.runs import provenance

TINY = model_config.DecoderConfig(model_type="qwen2", vocab_size=256, hidden_size=32,
                                  intermediate_size=64, num_layers=1, num_heads=2,
                                  num_kv_heads=1, head_dim=16, qkv_bias=True)
METHODS = ("dense", "gather", "sparse")


def build_config(args) -> model_config.DecoderConfig:
    cfg = TINY if args.preset == "tiny" else model_config.preset(args.preset)
    changes = {"param_dtype": args.dtype}
    if args.num_layers:
        changes["num_layers"] = args.num_layers
    if args.vocab:
        changes["vocab_size"] = args.vocab
    if "remat" in {f.name for f in dataclasses.fields(cfg)}:
        changes["remat"] = args.remat
    elif args.remat != "none":
        raise ValueError("--remat: this decoder has no remat option")
    return cfg.replace(**changes)


def make_batch(cfg, batch: int, length: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1::2, : length // 8] = 0  # left-padded rows
    weights = rng.normal(size=(batch, length - 1)).astype(np.float32)
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(weights)


def make_loss(graphdef, batch, chunk: int):
    tokens, mask, weights = batch

    def loss(p):  # a policy-gradient-shaped loss: weighted token log-probs
        logps = token_logprobs(graphdef, p, tokens, mask, chunk_size=chunk)
        return -jnp.sum(logps * weights * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    return loss


def make_step(method, loss, mask, backend):
    """``(params, state) -> (params, state, loss)``, jitted with both donated."""
    if method == "dense":
        tx = optax.adamw(1e-4)

        def step(params, state):
            value, g = jax.value_and_grad(loss)(params)
            updates, state = tx.update(g, state, params)
            return optax.apply_updates(params, updates), state, value

        return jax.jit(step, donate_argnums=(0, 1)), tx.init
    opt = fused_sparse_adamw(mask, 1e-4, backend=backend)

    def step(params, state):
        if method == "gather":
            value, g = jax.value_and_grad(loss)(params)
            g = jax.tree.map(lambda x, i: gather(x, i).astype(jnp.float32), g, state.indices)
        else:
            value, g = sparse_grads.value_and_grad(loss, params, state.indices,
                                                   backend=backend)
        params, state, _ = opt.update(params, g, state)
        return params, state, value

    return jax.jit(step, donate_argnums=(0, 1)), opt.init


def prepare_method(method, params, mask, loss, args):
    """Compiles one method's step; returns a runner and its compiled memory."""
    step, init = make_step(method, loss, mask, args.backend)
    carry = {"params": jax.tree.map(jnp.copy, params)}
    carry["state"] = init(carry["params"])
    compiled = step.lower(carry["params"], carry["state"]).compile()
    mem = compiled.memory_analysis()

    def run_once() -> float:
        t0 = time.perf_counter()
        carry["params"], carry["state"], carry["loss"] = compiled(carry["params"],
                                                                  carry["state"])
        jax.block_until_ready(carry["params"])
        return time.perf_counter() - t0

    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else None
    peak = None
    if mem is not None:
        peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                   + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    return run_once, carry, {"temp_bytes": temp, "peak_bytes": peak}


def run_interleaved(jobs, params, loss, args) -> list[dict]:
    """Compiles every job, then times them round-robin (one step of each per round,
    ``args.warmup`` untimed rounds first), so that a change in the machine's load
    hits every method alike; median ms per job."""
    prepared = []
    for density, method in tqdm(jobs, desc="compiling", file=sys.stderr):
        mask = None
        if method != "dense":
            mask = jax.tree.map(jnp.asarray, masks.random_mask(
                params, 1.0 - density, seed=args.seed, strategy=args.strategy))
        run_once, carry, mem = prepare_method(method, params, mask, loss, args)
        prepared.append((density, method, mask, run_once, carry, mem, []))
    for i in tqdm(range(args.warmup + args.steps), desc="rounds", file=sys.stderr):
        for *_, run_once, _, _, times in prepared:
            dt = run_once()
            if i >= args.warmup:
                times.append(dt)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    return [{"ms": 1e3 * float(np.median(times)), **mem, "loss": float(carry["loss"]),
             "density": density, "method": method, "params": n_params,
             "k": n_params if mask is None else masks.num_active(mask)}
            for density, method, mask, _, carry, mem, times in prepared]


def format_table(rows) -> str:
    head = (f"{'density':>9}{'k':>12}  {'method':<8}{'ms/step':>10}{'vs gather':>11}"
            f"{'vs dense':>10}{'temp MiB':>10}{'peak MiB':>10}")
    lines = [head, "-" * len(head)]
    mib = lambda b: f"{b / 2**20:>10.0f}" if b is not None else f"{'n/a':>10}"
    for r in rows:
        lines.append(f"{r['density']:>9.2%}{r['k']:>12,}  {r['method']:<8}{r['ms']:>10.1f}"
                     f"{r['speedup_vs_gather']:>10.2f}x{r['speedup_vs_dense']:>9.2f}x"
                     f"{mib(r['temp_bytes'])}{mib(r['peak_bytes'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="Qwen2.5-0.5B",
                        help=f"a model preset ({', '.join(sorted(model_config.PRESETS))}) "
                             "or 'tiny' (smoke tests)")
    parser.add_argument("--num-layers", type=int, default=2,
                        help="layers of the preset kept (0: all)")
    parser.add_argument("--vocab", type=int, default=16384,
                        help="vocabulary size (0: the preset's)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--length", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.001])
    parser.add_argument("--strategy", default="per_tensor", choices=masks.STRATEGIES)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="auto", choices=list(backends.BACKENDS),
                        help="sampled product and fused step implementation")
    parser.add_argument("--remat", default="none", help="the decoder's remat policy")
    parser.add_argument("--logprob-chunk", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default "
                        "runs/benchmarks/bench_train_step_<device>.json)")
    args = parser.parse_args(argv)
    for d in args.densities:
        if not 0.0 < d < 1.0:
            parser.error(f"--densities must be in (0, 1), got {d}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.length < 2:
        parser.error("--steps, --batch must be >= 1, --length >= 2, --warmup >= 0")
    try:
        cfg = build_config(args)
    except (KeyError, ValueError) as e:
        parser.error(str(e).strip("'\""))

    graphdef, params = nnx.split(init_model(cfg, seed=args.seed))
    loss = make_loss(graphdef, make_batch(cfg, args.batch, args.length, args.seed + 1),
                     args.logprob_chunk)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    jobs = [(1.0, "dense")] + [(d, m) for d in args.densities for m in ("gather", "sparse")]
    load_before = os.getloadavg()
    rows = run_interleaved(jobs, params, loss, args)
    load_after = os.getloadavg()
    dense_ms = rows[0]["ms"]
    for r in rows:
        gather_ms = next((g["ms"] for g in rows if g["method"] == "gather"
                          and g["density"] == r["density"]), r["ms"])
        r["speedup_vs_dense"] = dense_ms / r["ms"]
        r["speedup_vs_gather"] = gather_ms / r["ms"]
    device = jax.devices()[0]
    print(f"{args.preset}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, {cfg.param_dtype}, "
          f"{args.batch} x {args.length} tokens, {n_params:,} params, "
          f"backend {backends.resolve_backend(args.backend)}")
    print(format_table(rows))
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f}")
    record = {
        "benchmark": "bench_train_step",
        "device": f"{device.platform}:{device.device_kind}",
        "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "optax": optax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": provenance.git_commit(short=True),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "load_average": {"before": load_before, "after": load_after},
        "args": vars(args), "model": dataclasses.asdict(cfg), "results": rows,
    }
    write_result(record, args.out, "bench_train_step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
