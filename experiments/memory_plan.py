"""Memory plan of a GRPO run: what one training step and the sampler need, before renting a GPU.

Compiles, with abstract shapes only (``jax.eval_shape``: no weights allocated) and for
XLA's CPU backend, the trainer's own functions at the run's real shapes:

* the micro-batch gradient of the GRPO loss summed into the donated accumulator
  (:func:`sparsejax.trainers.grpo_step.accumulate_micro_batch`, which goes through the
  trainable's gradient path: the sparse backward or dense grad + gather),
* the optimizer step (``Trainable.apply``: the fused sparse AdamW, or ``optax.adamw``),
* the sampler's program (``sparsejax.generation.rollouts``: shared prefill and the decode slots,
  what the GRPO trainer runs), and one step of ``sparsejax.generation.sampler.decode_step`` (the
  plain KV-cache sampler) for comparison,

and reads ``compiled.memory_analysis()`` of each. The peak of a step is the largest of
its phases: what stays resident (params, optimizer state) plus what the phase holds
(accumulator, the program's arguments, outputs and temporaries). The same is done for a
dense ``optax.adamw`` run of the same config.

XLA's CPU pipeline removes optimization barriers before CSE, which merges
rematerialized layers back into the forward pass; XLA's GPU pipeline keeps them until
after CSE. The jobs keep them on a CPU too (:mod:`sparsejax.xla_flags`), and so does
this script (``--cpu-barrier-expansion`` restores XLA's CPU default), so that the plan
shows what remat saves, on a GPU as in a CPU run. The figures are XLA's CPU buffer assignment,
not a GPU measurement: a GPU's schedule and fusions differ somewhat, and the CUDA
context and allocator take their own share (the fit verdict keeps 5% headroom).
The sparse weight gradient is planned with its XLA implementation (its bounded chunks
are counted), not the CPU kernel.

Mixture-of-experts presets (``Qwen3-30B-A3B``): on a GPU the experts run as
``jax.lax.ragged_dot``, a native grouped matmul. XLA:CPU has none (it lowers ``ragged_dot``
to a dense product over all experts, and the CPU path's tiled loop keeps one set of loop
buffers per layer), so by default (``--moe-matmul standin``) the plan compiles a stand-in
with ``ragged_dot``'s buffers on a GPU: the ``[rows, out]`` output, its ``[rows, in]``
input gradient and a float32 ``[E, in, out]`` weight gradient, and no other temporaries.

Example::

    python experiments/memory_plan.py --preset Llama-3.1-8B --sparsity 0.99 \\
        --micro-batch-size 8 --generation-batch-size 64
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if __name__ == "__main__" and "--cpu-barrier-expansion" not in sys.argv:
    # Before jax starts its backends (see the module docstring).
    from sparsejax.xla_flags import keep_optimization_barriers
    keep_optimization_barriers()
# The sampled product is planned in its XLA form, whose chunks XLA's buffer assignment
# counts; the CPU kernel's working buffers live outside XLA (and a GPU runs the Pallas
# kernel, which has none).
os.environ.setdefault("SPARSEJAX_CPU_KERNELS", "0")

import argparse
import datetime
import functools
import platform

from sparsejax.cli.exits import fail
from sparsejax.runs import provenance

GIB = 2**30
HEADROOM = 0.95  # a "B GB" card is taken to fit a plan of at most 0.95 * B GiB
TINY = "tiny"  # a 2-layer toy config, for smoke tests


def parse_args(argv=None) -> argparse.Namespace:
    from sparsejax.models.config import PRESETS, REMAT_POLICIES  # numpy only, no jax
    parser = argparse.ArgumentParser(
        description="Memory plan of a GRPO run (XLA CPU compile of the trainer's real "
                    "functions at abstract shapes: nothing allocated).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="Llama-3.1-8B", choices=sorted(PRESETS) + [TINY])
    parser.add_argument("--num-layers", type=int, default=None,
                        help="override the preset's layer count (quick what-ifs)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--sparsity", type=float, default=0.99,
                        help="fraction of weights frozen in the sparse run (> 0)")
    parser.add_argument("--mask-strategy", default="per_tensor",
                        choices=["per_tensor", "global", "row_balanced"])
    parser.add_argument("--sparse-grads", default="auto", choices=["auto", "on", "off"],
                        help="the sparse run's gradient path (TrainableConfig.sparse_grads)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--completion-length", type=int, default=1024)
    parser.add_argument("--generation-batch-size", type=int, default=64,
                        help="decode slots: sequences whose KV cache is held at once")
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--num-generations", type=int, default=16)
    parser.add_argument("--remat", default="layer", choices=list(REMAT_POLICIES))
    parser.add_argument("--attention-chunk-size", type=int, default=512)
    parser.add_argument("--logprob-chunk-size", type=int, default=1024)
    parser.add_argument("--budgets", default="24,40,80",
                        help="GPU sizes in GB to judge the fit against")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense AdamW plan")
    parser.add_argument("--no-sampler", action="store_true", help="skip the sampler plan")
    parser.add_argument("--sampler-only", action="store_true",
                        help="only the sampler plans (no training step; resident = params)")
    parser.add_argument("--moe-matmul", default="standin", choices=["standin", "tiled"],
                        help="how MoE layers' grouped matmuls are planned (module docstring)")
    parser.add_argument("--cpu-barrier-expansion", action="store_true",
                        help="keep XLA CPU's early removal of optimization barriers "
                             "(remat then saves nothing in the plan)")
    parser.add_argument("--out", default=None,
                        help="JSON file (default runs/memory_plans/memory_plan_<...>.json)")
    args = parser.parse_args(argv)
    for name in ("micro_batch_size", "prompt_length", "completion_length",
                 "generation_batch_size", "prompts_per_step", "num_generations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.num_layers is not None and args.num_layers < 1:
        parser.error("--num-layers must be >= 1")
    if args.attention_chunk_size < 0 or args.logprob_chunk_size < 1:
        parser.error("--attention-chunk-size must be >= 0 and --logprob-chunk-size >= 1")
    try:
        args.budget_list = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--budgets must be comma-separated numbers, got {args.budgets!r}")
    total = args.prompts_per_step * args.num_generations
    if total % args.micro_batch_size:
        parser.error(f"--micro-batch-size {args.micro_batch_size} must divide prompts per "
                     f"step x generations = {total}")
    return args


def model_config(args):
    from sparsejax.models.config import DecoderConfig, preset
    base = (DecoderConfig(param_dtype=args.dtype) if args.preset == TINY
            else preset(args.preset, param_dtype=args.dtype))
    changes = dict(remat=args.remat, attention_chunk_size=args.attention_chunk_size)
    if args.num_layers is not None:
        changes["num_layers"] = args.num_layers
    return base.replace(**changes)


def use_grouped_matmul_standin() -> None:
    """Plans MoE layers' grouped matmuls with the buffers ``ragged_dot`` has on a GPU (see
    the module docstring); the values are not the product's."""
    import jax
    import jax.numpy as jnp

    from sparsejax.models import moe

    @jax.custom_vjp
    def standin(x, w, group_sizes):
        return jnp.matmul(x, w[0], preferred_element_type=jnp.float32).astype(x.dtype)

    def fwd(x, w, group_sizes):
        return standin(x, w, group_sizes), (x, w)

    def bwd(res, dy):
        x, w = res
        dw = jnp.zeros(w.shape, jnp.float32).at[0].set(
            jnp.matmul(x.T, dy, preferred_element_type=jnp.float32))
        return moe_dx(dy, w, None).astype(x.dtype), dw.astype(w.dtype), None

    def moe_dx(dy, w, group_sizes, **_):
        return jnp.matmul(dy, w[0].T, preferred_element_type=jnp.float32).astype(dy.dtype)

    standin.defvjp(fwd, bwd)
    original = moe.grouped_matmul

    def grouped_matmul(x, w, group_sizes, **kwargs):
        if hasattr(w, "grouped_rmatmul"):  # a sparse-backward weight: its own vjp
            return original(x, w, group_sizes, **kwargs)
        return standin(x, w, group_sizes)

    moe.grouped_matmul, moe.grouped_matmul_dx = grouped_matmul, moe_dx


def memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {k: int(getattr(m, f"{k}_size_in_bytes"))
            for k in ("argument", "output", "alias", "temp")}


def tree_bytes(tree) -> int:
    import jax
    import numpy as np
    return int(sum(np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def plan_training(graphdef, params, trainable_cfg, grpo_cfg, mask, args) -> dict:
    """Per-part bytes and per-phase peaks of one training step (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    from sparsejax.trainable import build_trainable
    from sparsejax.trainable.base import zero_gradient
    from sparsejax.trainers.grpo_step import accumulate_micro_batch

    trainable = build_trainable(trainable_cfg, params, mask=mask)
    opt_state = jax.eval_shape(trainable.init, params)
    # The trainer's own micro-batch function, on abstract shapes.
    grad_step = functools.partial(accumulate_micro_batch, graphdef, trainable, grpo_cfg)
    sds = jax.ShapeDtypeStruct
    b, p, c = args.micro_batch_size, args.prompt_length, args.completion_length
    batch = {"prompt_tokens": sds((b, p), jnp.int32), "prompt_mask": sds((b, p), jnp.int32),
             "tokens": sds((b, c), jnp.int32), "mask": sds((b, c), jnp.int32),
             "advantages": sds((b,), jnp.float32)}
    num_items = sds((), jnp.float32)
    grads = jax.eval_shape(functools.partial(zero_gradient, trainable), params, opt_state)
    grad = memory(jax.jit(grad_step, donate_argnums=0).lower(
        grads, params, opt_state, batch, num_items).compile())
    step = memory(type(trainable).apply.lower(trainable, params, grads, opt_state).compile())

    p_bytes, acc_bytes = tree_bytes(params), tree_bytes(grads)
    if trainable.mask is not None:
        opt_parts = {"moments": tree_bytes((opt_state.mu, opt_state.nu)),
                     "master_values": tree_bytes(opt_state.master),
                     "mask_indices": tree_bytes(opt_state.indices)}
    else:
        opt_parts = {"moments": tree_bytes(opt_state), "master_values": 0, "mask_indices": 0}
    opt_bytes = tree_bytes(opt_state)
    resident = p_bytes + opt_bytes
    phases = {  # the accumulator is an argument of the micro-batch program (donated)
        "micro_batch_gradient": resident + acc_bytes + tree_bytes(batch) + grad["output"]
        - grad["alias"] + grad["temp"],
        "optimizer_step": resident + step["argument"] - p_bytes - opt_bytes + step["output"]
        - step["alias"] + step["temp"],
    }
    return {"trainable": trainable.num_trainable(params),
            "sparse_grads": bool(trainable.sparse_grads),
            "params": p_bytes, "optimizer_state": opt_bytes, **opt_parts,
            "gradient_accumulator": acc_bytes, "activations_temporaries": grad["temp"],
            "step_temporaries": step["temp"], "phases": phases,
            "compiled": {"micro_batch_gradient": grad, "optimizer_step": step}, "_resident": resident}


def plan_sampler(graphdef, params, config, args) -> dict:
    """The trainer's rollout program: prefill of a step's prompts, then the decode slots."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sparsejax.generation import rollouts
    from sparsejax.generation.sampler import SamplingParams, bucket_length

    lp = bucket_length(args.prompt_length)
    n = args.completion_length
    total = args.prompts_per_step * args.num_generations
    slots = min(args.generation_batch_size, total)
    chunk = 256  # rollout()'s default
    static = dict(sampling=SamplingParams(max_new_tokens=n, temperature=1.0),
                  num_samples=args.num_generations, num_slots=slots, chunk=chunk, pad_id=0)
    sds = jax.ShapeDtypeStruct
    prompts = sds((args.prompts_per_step, lp), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    fn = jax.jit(rollouts.rollout_program, static_argnums=0,
                 static_argnames=tuple(static))
    gen = memory(fn.lower(graphdef, params, prompts, prompts, key, **static).compile())
    itemsize = np.dtype(config.dtype).itemsize
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize
    # each slot holds its generated tokens; the prompts' keys are held once per prompt
    whole_chunks = lambda length: -(-length // chunk) * chunk
    kv = per_token * (slots * whole_chunks(n) + args.prompts_per_step * whole_chunks(lp))
    return {"decode_slots": slots, "kv_cache": kv, "sampler_temporaries": gen["temp"],
            "compiled": gen,
            "_extra": gen["argument"] - tree_bytes(params) + gen["output"] + gen["temp"]}


def plan_decode_step(graphdef, params, config, args) -> dict:
    """One step of :func:`sparsejax.generation.sampler.decode_step` (the plain KV-cache sampler) for
    ``generation_batch_size`` sequences over a full ``prompt + completion`` cache (donated,
    updated in place)."""
    import jax
    import jax.numpy as jnp

    from sparsejax.generation import sampler as sampling

    b, length = args.generation_batch_size, args.prompt_length + args.completion_length
    cache = jax.eval_shape(lambda: sampling.init_cache(config, b, length))
    token = jax.ShapeDtypeStruct((b,), jnp.int32)
    fn = jax.jit(sampling.decode_step, static_argnums=0, donate_argnums=3)
    step = memory(fn.lower(graphdef, params, token, cache).compile())
    kv = tree_bytes(cache.layers)
    return {"decode_step_kv_cache": kv, "decode_step_temporaries": step["temp"],
            "compiled": step,
            "_extra": step["argument"] - tree_bytes(params) + step["output"] - step["alias"]
            + step["temp"]}


ROWS = [("params", "params"), ("optimizer state", "optimizer_state"),
        ("  moments", "moments"), ("  master values", "master_values"),
        ("  mask indices", "mask_indices"), ("gradient accumulator", "gradient_accumulator"),
        ("activations/temporaries", "activations_temporaries"),
        ("optimizer-step temporaries", "step_temporaries"), ("KV cache", "kv_cache"),
        ("sampler temporaries (incl. KV)", "sampler_temporaries"),
        ("sampling.py decode step: KV", "decode_step_kv_cache"),
        ("sampling.py decode step: temp", "decode_step_temporaries"),
        ("peak: sampling (rollouts)", "peak_sampling"),
        ("peak: sampling.py decode", "peak_decode_step"), ("peak: micro-batch gradient", "peak_gradient"),
        ("peak: optimizer step", "peak_step"), ("TOTAL (peak)", "total"),
        ("TOTAL with sampling.py decode", "total_with_sampling_py")]


def finish(train: dict, sampler: dict | None, decode: dict | None = None) -> dict:
    out = {k: v for k, v in train.items() if not k.startswith("_")}
    if decode is not None:
        out.update({k: v for k, v in decode.items() if not k.startswith("_")
                    and k != "compiled"})
        out["compiled"] = dict(out["compiled"], decode_step=decode["compiled"])
        out["peak_decode_step"] = train["_resident"] + decode["_extra"]
    out["peak_gradient"] = train["phases"]["micro_batch_gradient"]
    out["peak_step"] = train["phases"]["optimizer_step"]
    if sampler is not None:
        out.update({k: v for k, v in sampler.items() if not k.startswith("_")
                    and k != "compiled"})
        out["compiled"] = dict(out["compiled"], sampler=sampler["compiled"])
        out["peak_sampling"] = train["_resident"] + sampler["_extra"]
    out["total"] = max(out.get("peak_sampling", 0), out["peak_gradient"], out["peak_step"])
    if "peak_decode_step" in out:
        out["total_with_sampling_py"] = max(out["peak_decode_step"], out["peak_gradient"],
                                            out["peak_step"])
    return out


def format_table(plans: dict[str, dict], budgets: list[float]) -> str:
    names = list(plans)
    big = max(p["total"] for p in plans.values()) >= GIB
    unit, scale = ("GiB", GIB) if big else ("MiB", 2**20)
    lines = [f"{unit:<32}" + "".join(f"{n:>16}" for n in names), "-" * (32 + 16 * len(names))]
    for label, key in ROWS:
        if all(key not in p for p in plans.values()):
            continue
        cells = "".join(f"{plans[n][key] / scale:>16.2f}" if key in plans[n] else f"{'-':>16}"
                        for n in names)
        lines.append(f"{label:<32}{cells}")
    for b in budgets:
        cells = "".join(f"{('fits' if plans[n]['total'] <= HEADROOM * b * GIB else 'no'):>16}"
                        for n in names)
        lines.append(f"{f'fits {b:g} GB (<= {HEADROOM:.0%})':<32}{cells}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import time

    import flax
    import jax
    from flax import nnx

    from sparsejax import masks as masks_lib
    from sparsejax.config import GRPOConfig, TrainableConfig
    from sparsejax.models.decoder import Decoder
    from sparsejax.runs.reporting import write_json

    t0 = time.perf_counter()
    config = model_config(args)
    if config.num_experts and args.moe_matmul == "standin":
        use_grouped_matmul_standin()
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    try:
        grpo_cfg = GRPOConfig(max_new_tokens=args.completion_length,
                              micro_batch_size=args.micro_batch_size,
                              generation_batch_size=args.generation_batch_size,
                              prompts_per_step=args.prompts_per_step,
                              num_generations=args.num_generations,
                              logprob_chunk_size=args.logprob_chunk_size, remat=args.remat)
        extra = {"sparse_grads": args.sparse_grads} if "sparse_grads" in {
            f.name for f in __import__("dataclasses").fields(TrainableConfig)} else {}
        trainable_cfg = TrainableConfig(sparsity=args.sparsity, mask_strategy=args.mask_strategy,
                                  **extra)
    except ValueError as e:
        fail(str(e))
    print(f"{args.preset}: {config.num_params():,} params ({args.dtype}), "
          f"{config.num_layers} layers; drawing the {args.sparsity} mask...", file=sys.stderr)
    mask = masks_lib.random_mask(params, args.sparsity, strategy=args.mask_strategy)
    sampler = decode = None
    if not args.no_sampler:
        print("compiling the sampler (rollouts) and sampling.decode_step...", file=sys.stderr)
        sampler = plan_sampler(graphdef, params, config, args)
        decode = plan_decode_step(graphdef, params, config, args)
    plans = {}
    if args.sampler_only:
        if sampler is None:
            fail("--sampler-only and --no-sampler exclude each other")
        p_bytes = tree_bytes(params)
        plans["sampler"] = {
            "params": p_bytes, **{k: v for s_ in (sampler, decode) for k, v in s_.items()
                                  if not k.startswith("_") and k != "compiled"},
            "compiled": {"sampler": sampler["compiled"], "decode_step": decode["compiled"]},
            "peak_sampling": p_bytes + sampler["_extra"],
            "peak_decode_step": p_bytes + decode["_extra"]}
        plans["sampler"]["total"] = plans["sampler"]["peak_sampling"]
    else:
        print("compiling the sparse training step...", file=sys.stderr)
        plans[f"sparse {args.sparsity:g}"] = finish(
            plan_training(graphdef, params, trainable_cfg, grpo_cfg, mask, args), sampler, decode)
    if not args.no_dense and not args.sampler_only:
        print("compiling the dense AdamW training step...", file=sys.stderr)
        plans["dense AdamW"] = finish(plan_training(
            graphdef, params, TrainableConfig(sparsity=0.0), grpo_cfg, None, args), sampler,
            decode)
    table = format_table(plans, args.budget_list)
    print(f"\n{args.preset}, {args.dtype}, micro-batch {args.micro_batch_size} x "
          f"({args.prompt_length} + {args.completion_length}) tokens, generation batch "
          f"{args.generation_batch_size}, remat {args.remat} "
          f"(XLA CPU compile, abstract shapes)\n{table}")
    record = {
        "what": "memory plan (XLA CPU compile of the trainer's functions, abstract shapes)",
        "device": f"compiled for {jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
        "versions": {"jax": jax.__version__, "flax": flax.__version__,
                     "python": platform.python_version()},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": provenance.git_commit(short=True), "command": " ".join(["python"] + sys.argv),
        "config": {k: v for k, v in vars(args).items() if k != "budget_list"},
        "model": {"preset": args.preset, "num_params": config.num_params(),
                  "num_layers": config.num_layers},
        "budgets_gb": args.budget_list, "headroom": HEADROOM,
        "fits": {n: {f"{b:g}": p["total"] <= HEADROOM * b * GIB for b in args.budget_list}
                 for n, p in plans.items()},
        "plans": plans, "wall_s": time.perf_counter() - t0,
    }
    out = args.out or os.path.join(
        "runs", "memory_plans",
        f"memory_plan_{args.preset}_mb{args.micro_batch_size}_gen"
        f"{args.generation_batch_size}_{args.remat}{'_sampler' if args.sampler_only else ''}"
        ".json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(out, record)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
