"""GRPO rollout benchmark: the slot sampler vs the batch sampler vs transformers' generate.

The workload of one GRPO step: ``--prompts`` prompts x ``--samples`` samples, up to
``--new-tokens`` tokens, sampled at temperature 1. Prompts have the token lengths of
real GSM8K prompts (question + ``\\boxed{}`` instruction through the Qwen2.5 chat
template; ids folded into the model's vocabulary: the weights are random, so only the
shapes matter). Completion lengths vary as real ones do: a random set of stop tokens
holds ``1 / --mean-length`` of the vocabulary, so that each token ends the completion
with that probability (geometric lengths; the default mean, 124, is the mean token
length of GSM8K's reference solutions).

Side by side in one process, on the same model and the same batch:

* ``batch``: :func:`sparsejax.generation.sampler.generate` on all ``P x G`` rows (each row
  prefills its prompt; the batch decodes until its longest completion ends);
* ``slots``: :func:`sparsejax.generation.rollouts.rollout` (shared prefill, continuous batching
  over ``--slots`` decode slots, attention over the filled chunks);
* ``hf``: transformers' batched ``generate`` (PyTorch, left padded, the same weights
  and rows, ``do_sample=True, top_k=0``).

Reported per sampler: useful tokens/s (tokens up to and including the stop token,
compilation excluded), decode steps, slot occupancy (useful tokens / rows computed),
and the mean decode step against its floor, the larger of two: the bytes a step must
read (all params plus the keys/values each active sequence holds: its prompt's tokens
and those generated) over the memory bandwidth measured here (a jitted sum over a
512 MB array), and its weight matmuls (2 x params FLOPs per row computed, the mean
width of the step) at the float32 throughput of a jitted 1024^3 matmul. JSON goes under
``--out`` (default under ``runs/benchmarks/``) with device, versions, date, commit,
command and CPU load.

Example::

    python experiments/bench_sampler.py                 # SmolLM2-135M shapes, 8 x 8, 256
    python experiments/bench_sampler.py --tiny          # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.generation import rollouts
from sparsejax.generation import sampler as sampling
from sparsejax.models import PRESETS, DecoderConfig, init_model
from sparsejax.runs import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

#: SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M config.json), float32.
SMOLLM2_135M = DecoderConfig(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
    bos_token_id=0, eos_token_ids=(0,), param_dtype="float32")
TINY = DecoderConfig(model_type="llama", vocab_size=256, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, tie_word_embeddings=True, param_dtype="float32")
MODELS = {"SmolLM2-135M": SMOLLM2_135M, **PRESETS}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", "--preset", default="SmolLM2-135M", choices=sorted(MODELS),
                        help="model shapes (random weights)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny model, 2 prompts x 3 samples, 12 new tokens (smoke test)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--mean-length", type=float, default=124.0,
                        help="1 / per-token stop probability (GSM8K solutions: 124)")
    parser.add_argument("--slots", default="16,32",
                        help="comma-separated decode slot counts of the slot sampler")
    parser.add_argument("--chunk-size", type=int, default=64,
                        help="cache slots per decode-attention chunk")
    parser.add_argument("--width-buckets", type=int, default=3,
                        help="loop widths of the slot sampler (slots, slots/2, ...)")
    parser.add_argument("--batch-rows", default="64",
                        help="comma-separated rows per call of the batch sampler "
                             "(default all P x G rows at once, as the trainer did)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--bandwidth-gbps", type=float, default=None,
                        help="memory bandwidth for the floor (default: measured)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default "
                        "runs/benchmarks/bench_sampler_<model>_<time>.json)")
    args = parser.parse_args(argv)
    for name in ("prompts", "samples", "new_tokens", "chunk_size", "width_buckets"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mean_length < 1:
        parser.error("--mean-length must be >= 1")
    return args


def gsm8k_prompt_lengths(count: int, seed: int) -> list[int]:
    """Token lengths of ``count`` GSM8K test prompts in the Qwen2.5 chat format."""
    path = os.path.join(SHARED, "data", "gsm8k", "test.jsonl")
    tok_dir = os.path.join(SHARED, "tokenizers", "qwen2.5")
    if not (os.path.exists(path) and os.path.isdir(tok_dir)):
        return np.random.default_rng(seed).integers(90, 180, count).tolist()
    from transformers import AutoTokenizer

    from sparsejax.data.gsm8k import format_prompt
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    pick = np.random.default_rng(seed).choice(len(rows), count, replace=False)
    return [len(tok(format_prompt(rows[i]["question"], tok), add_special_tokens=False)
                ["input_ids"]) for i in pick]


def workload(config: DecoderConfig, args) -> dict:
    """Prompts (token ids), the stop set and the pad id."""
    rng = np.random.default_rng(args.seed)
    lengths = ([int(rng.integers(3, 9)) for _ in range(args.prompts)] if args.tiny
               else gsm8k_prompt_lengths(args.prompts, args.seed))
    stops = max(1, round(config.vocab_size / args.mean_length))
    ids = rng.permutation(np.arange(1, config.vocab_size))
    stop_ids, body = ids[:stops], ids[stops:]
    prompts = [rng.choice(body, n).tolist() for n in lengths]
    return {"prompts": prompts, "stop_ids": tuple(int(t) for t in stop_ids), "pad_id": 0}


def measure_bandwidth_gbps() -> float:
    """Read bandwidth of a jitted sum over 512 MB (best of 5), GB/s."""
    x = jnp.ones((128 * 2**20,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
    return x.nbytes / best / 1e9


def measure_gemm_gflops() -> float:
    """float32 matmul throughput of a jitted 1024^3 product (best of 5), GFLOP/s."""
    a = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(5))
    return 2 * 1024 ** 3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def useful_mask(tokens: np.ndarray, stop_ids) -> np.ndarray:
    """1 up to and including each row's first stop token."""
    is_stop = np.isin(tokens, np.asarray(stop_ids))
    first = np.where(is_stop.any(1), is_stop.argmax(1), tokens.shape[1] - 1)
    return (np.arange(tokens.shape[1])[None] <= first[:, None]).astype(np.int32)


def kv_bytes_per_token(config: DecoderConfig) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * \
        jnp.dtype(config.param_dtype).itemsize


def floor_ms(config: DecoderConfig, steps: int, context_sum: float, gbps: float) -> float:
    """Mean time a decode step needs to read all params and the filled caches."""
    param_bytes = config.num_params() * jnp.dtype(config.param_dtype).itemsize
    total = steps * param_bytes + context_sum * kv_bytes_per_token(config)
    return 1e3 * total / max(steps, 1) / (gbps * 1e9)


def compute_floor_ms(config: DecoderConfig, rows: float, gflops: float) -> float:
    """Mean time a decode step of ``rows`` rows needs for its weight matmuls
    (2 x params FLOPs per row) at the measured large-matmul throughput."""
    return 1e3 * 2 * config.num_params() * rows / (gflops * 1e9)


def run_batch(graphdef, params, config, work, sp, rows, key) -> dict:
    """The batch sampler over all P x G rows, ``rows`` per call."""
    seqs = [p for p in work["prompts"] for _ in range(work["samples"])]
    compile_s = run_s = prefill_s = 0.0
    steps, useful, ctx, out_tokens = 0, 0, 0.0, []
    for start in range(0, len(seqs), rows):
        chunk = seqs[start:start + rows]
        tokens, mask = sampling.left_pad(chunk, work["pad_id"])
        static = dict(sampling=sp, pad_id=work["pad_id"])
        t0 = time.perf_counter()
        compiled = sampling.generate_program.lower(
            graphdef, params, tokens, mask, key, **static).compile()
        compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        toks, _, _ = jax.device_get(compiled(params, tokens, mask, jax.random.fold_in(
            key, start)))
        run_s += time.perf_counter() - t0
        prefill_s += time_prefill(graphdef, params, config, tokens, mask)
        m = useful_mask(np.asarray(toks), sp.stop_token_ids)
        n_steps = int(m.sum(1).max())
        steps += n_steps
        useful += int(m.sum())
        # every row attends over the whole preallocated cache (P + N slots) each step
        ctx += n_steps * len(chunk) * (tokens.shape[1] + sp.max_new_tokens)
        out_tokens.append(m.sum(1))
    return dict(compile_s=compile_s, run_s=run_s, prefill_s=prefill_s, decode_steps=steps,
                rows=rows, useful_tokens=useful, occupancy=useful / (steps * rows),
                kv_context_sum=ctx, lengths=np.concatenate(out_tokens))


@functools.cache
def _prefill_fn(graphdef, config):
    return jax.jit(lambda p, t, m: sampling.prefill(
        graphdef, p, t, m, sampling.init_cache(config, t.shape[0], t.shape[1]))[0])


def time_prefill(graphdef, params, config, tokens, mask) -> float:
    """Best of two prefills of the left-padded ``tokens`` (after one to compile)."""
    fn = _prefill_fn(graphdef, config)
    fn(params, tokens, mask).block_until_ready()
    return min(_timed(lambda: fn(params, tokens, mask).block_until_ready()) for _ in range(2))


def run_slots(graphdef, params, config, work, sp, slots, chunk, width_buckets, key) -> dict:
    tokens, mask = sampling.left_pad(work["prompts"], work["pad_id"])
    out = rollouts.rollout(graphdef, params, tokens, mask, key, sp,
                           num_samples=work["samples"], num_slots=slots, chunk_size=chunk,
                           pad_id=work["pad_id"], width_buckets=width_buckets)
    st = out.stats
    prefill_s = time_prefill(graphdef, params, config, *rollouts.rebucket(
        tokens, mask, work["pad_id"]))
    # a step reads the chunks up to the longest active filled length; the ideal floor
    # counts each active sequence's own keys (its prompt's tokens + those generated)
    plen = out.prompt_mask.sum(axis=1)
    ctx = float(sum(sum(int(p) + t + 1 for t in range(n)) for p, n in zip(plen, out.lengths)))
    return dict(compile_s=st.compile_s, run_s=st.run_s, prefill_s=prefill_s,
                decode_steps=st.decode_steps, slot_steps=st.slot_steps,
                rows=st.slot_steps / max(st.decode_steps, 1),
                useful_tokens=st.useful_tokens, occupancy=st.occupancy,
                kv_context_sum=ctx, lengths=out.lengths)


def run_hf(graphdef, params, work, sp, seed) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from sparsejax.models.hf_io import save_hf
    with tempfile.TemporaryDirectory() as folder:
        save_hf(nnx.merge(graphdef, params), folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seqs = [p for p in work["prompts"] for _ in range(work["samples"])]
    tokens, mask = sampling.left_pad(seqs, work["pad_id"])
    torch.manual_seed(seed)
    kwargs = dict(input_ids=torch.tensor(tokens, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=True,
                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=sp.max_new_tokens,
                  eos_token_id=list(sp.stop_token_ids), pad_token_id=work["pad_id"])
    with torch.no_grad():
        t0 = time.perf_counter()
        out = hf.generate(**kwargs)
        run_s = time.perf_counter() - t0
    gen = out[:, tokens.shape[1]:].numpy()
    m = useful_mask(np.pad(gen, ((0, 0), (0, sp.max_new_tokens - gen.shape[1]))),
                    sp.stop_token_ids)
    m[:, gen.shape[1]:] = 0
    steps = gen.shape[1]
    ctx = float(sum(len(seqs) * (tokens.shape[1] + t + 1) for t in range(steps)))
    return dict(compile_s=0.0, run_s=run_s, prefill_s=None, decode_steps=steps,
                rows=len(seqs), useful_tokens=int(m.sum()),
                occupancy=int(m.sum()) / (steps * len(seqs)), kv_context_sum=ctx,
                lengths=m.sum(1), torch_threads=torch.get_num_threads(),
                torch_version=torch.__version__)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        name, config = "tiny", TINY
        args.prompts, args.samples, args.new_tokens = 2, 3, 12
        args.mean_length = min(args.mean_length, 6.0)
        slot_counts, batch_rows = [2], [6]
    else:
        name = args.model
        config = MODELS[name].replace(param_dtype=args.dtype)
        slot_counts = [int(s) for s in args.slots.split(",")]
        batch_rows = [int(r) for r in args.batch_rows.split(",")]
    load = {"start": os.getloadavg()}
    work = workload(config, args)
    work["samples"] = args.samples
    sp = sampling.SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0,
                                 stop_token_ids=work["stop_ids"])
    graphdef, params = nnx.split(init_model(config, seed=args.seed))
    key = jax.random.key(args.seed)
    gbps = args.bandwidth_gbps or measure_bandwidth_gbps()
    gflops = measure_gemm_gflops()
    print(f"{name}: {config.num_params() / 1e6:.1f}M params {config.param_dtype}, "
          f"{args.prompts} prompts x {args.samples} samples, <= {args.new_tokens} new "
          f"tokens, stop p = {len(work['stop_ids']) / config.vocab_size:.4f}/token, "
          f"bandwidth {gbps:.1f} GB/s, matmul {gflops:.0f} GFLOP/s, load {load['start'][0]:.2f}", flush=True)

    out = args.out or os.path.join("runs", "benchmarks", "bench_sampler_"
                                   f"{name}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def partial(results):
        """Raw results so far (a long baseline may not finish): ``<out>.partial``."""
        with open(out + ".partial", "w", encoding="utf-8") as f:
            json.dump({"command": " ".join(sys.argv), "load": os.getloadavg(),
                       "results": results}, f, indent=1, default=lambda a: np.asarray(a).tolist())

    results = []
    for slots in slot_counts:
        r = run_slots(graphdef, params, config, work, sp, slots, args.chunk_size,
                      args.width_buckets, key)
        results.append({"sampler": "slots", "label": f"slots ({slots} slots)", **r})
        print(f"  done {results[-1]['label']}: {r['run_s']:.1f} s", flush=True)
        partial(results)
    for rows in batch_rows:
        r = run_batch(graphdef, params, config, work, sp, rows, key)
        results.append({"sampler": "batch", "label": f"batch ({rows} rows/call)", **r})
        print(f"  done {results[-1]['label']}: {r['run_s']:.1f} s", flush=True)
        partial(results)
    if not args.no_hf:
        r = run_hf(graphdef, params, work, sp, args.seed)
        results.append({"sampler": "hf", "label": f"transformers generate ({r['rows']} rows)",
                        **r})
        print(f"  done hf: {r['run_s']:.1f} s", flush=True)
    load["end"] = os.getloadavg()

    base = next(r for r in results if r["sampler"] == "batch")
    for r in results:
        r["tokens_per_s"] = r["useful_tokens"] / r["run_s"]
        r["speedup_vs_batch"] = r["tokens_per_s"] / (base["useful_tokens"] / base["run_s"])
        decode_s = r["run_s"] - (r["prefill_s"] or 0.0)
        r["decode_step_ms"] = 1e3 * decode_s / max(r["decode_steps"], 1)
        r["bandwidth_floor_ms"] = floor_ms(config, r["decode_steps"], r["kv_context_sum"],
                                           gbps)
        r["compute_floor_ms"] = compute_floor_ms(config, r["rows"], gflops)
        r["floor_step_ms"] = max(r["bandwidth_floor_ms"], r["compute_floor_ms"])
        lengths = np.asarray(r.pop("lengths"))
        r["length_stats"] = {"mean": float(lengths.mean()), "p10": float(np.percentile(
            lengths, 10)), "p50": float(np.median(lengths)), "p90": float(
                np.percentile(lengths, 90)), "max": int(lengths.max())}

    print(f"\n{'sampler':<34} {'useful tok/s':>12} {'x batch':>8} {'steps':>6} "
          f"{'occupancy':>9} {'rows':>5} {'step ms':>8} {'floor ms':>8} {'compile s':>9} "
          f"{'mean len':>8}")
    for r in results:
        print(f"{r['label']:<34} {r['tokens_per_s']:>12.1f} {r['speedup_vs_batch']:>7.2f}x "
              f"{r['decode_steps']:>6} {100 * r['occupancy']:>8.1f}% {r['rows']:>5.1f} "
              f"{r['decode_step_ms']:>8.1f} {r['floor_step_ms']:>8.1f} "
              f"{r['compile_s']:>9.1f} {r['length_stats']['mean']:>8.1f}")

    import flax
    import transformers
    report = {
        "benchmark": "bench_sampler", "model": name,
        "config": {k: str(v) for k, v in config.__dict__.items()},
        "num_params": config.num_params(),
        "workload": {"prompts": args.prompts, "samples": args.samples,
                     "max_new_tokens": args.new_tokens, "mean_length": args.mean_length,
                     "num_stop_tokens": len(work["stop_ids"]),
                     "prompt_lengths": [len(p) for p in work["prompts"]],
                     "chunk_size": args.chunk_size},
        "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
        "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "load_average": load, "bandwidth_gbps": gbps, "matmul_gflops": gflops,
        "versions": {"jax": jax.__version__, "flax": flax.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "git_commit": provenance.git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "results": results,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    if os.path.exists(out + ".partial"):
        os.remove(out + ".partial")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
