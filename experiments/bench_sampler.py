"""Sampler throughput: prefill and decode tokens/s beside the HBM roofline.

For a preset with random weights (the weights do not change the work), at each batch
size: prefill ``--prompt-len`` tokens per row, then decode ``--new-tokens`` tokens
(no stop tokens, so every step runs). Decode is memory bound: each step reads all the
weights once plus the KV cache, so the roofline is::

    step_time >= (weight_bytes + kv_bytes_read) / hbm_bandwidth
    decode tokens/s <= batch / step_time

``kv_bytes_read`` uses the mean context length ``prompt + new/2`` (the ideal); the
sampler attends over the whole preallocated cache (``prompt + new`` slots, masked), so
the bound it can reach is also reported. Results go to a JSON file under
``experiments/results/`` with device, JAX version, date, git commit and command.

Example::

    python experiments/bench_sampler.py --preset Qwen2.5-0.5B --batch-sizes 1,16,64
    python experiments/bench_sampler.py --tiny          # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparsejax import sampling
from sparsejax.models import PRESETS, DecoderConfig, init_model

TINY = DecoderConfig(model_type="llama", vocab_size=256, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, tie_word_embeddings=True, param_dtype="float32")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="Qwen2.5-0.5B", choices=sorted(PRESETS),
                        help="model shapes (random weights)")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny float32 model, batch 2, prompt 16, 8 new tokens "
                             "(CPU smoke test; overrides --preset and sizes)")
    parser.add_argument("--batch-sizes", default="1,16,64",
                        help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per batch size (the best is reported)")
    parser.add_argument("--hbm-gbps", type=float, default=3350.0,
                        help="peak HBM bandwidth in GB/s (3350: H100 SXM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="JSON path (default experiments/results/bench_sampler_<model>_<time>.json)")
    return parser.parse_args(argv)


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def roofline(config: DecoderConfig, batch: int, context: float, hbm_gbps: float) -> dict:
    """Bytes read per decode step and the decode tokens/s they allow."""
    itemsize = jnp.dtype(config.param_dtype).itemsize
    weights = config.num_params()
    if not config.tie_word_embeddings:
        weights -= config.vocab_size * config.hidden_size  # only `batch` rows gathered
    weight_bytes = weights * itemsize
    kv_bytes = (2 * config.num_layers * batch * context * config.num_kv_heads
                * config.head_dim * itemsize)
    step_s = (weight_bytes + kv_bytes) / (hbm_gbps * 1e9)
    return {"weight_bytes": int(weight_bytes), "kv_bytes": int(kv_bytes),
            "step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s}


def bench_one(graphdef, params, config: DecoderConfig, batch: int, prompt_len: int,
              new_tokens: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, prompt_len), dtype=np.int32)
    mask = np.ones_like(tokens)
    params_s = sampling.SamplingParams(max_new_tokens=new_tokens, temperature=1.0)

    @jax.jit
    def run_prefill(params, tokens, mask):
        cache = sampling.init_cache(config, batch, prompt_len + new_tokens)
        return sampling.prefill(graphdef, params, tokens, mask, cache)

    def timed(fn):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t0

    compile_prefill = timed(lambda: run_prefill(params, tokens, mask))
    prefill_s = min(timed(lambda: run_prefill(params, tokens, mask)) for _ in range(repeats))
    gen = lambda k: sampling.generate(graphdef, params, tokens, mask,  # noqa: E731
                                      jax.random.key(k), params_s, bucket=False)
    compile_gen = timed(lambda: gen(seed).tokens)
    total_s = min(timed(lambda: gen(seed + 1 + r).tokens) for r in range(repeats))
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "prefill_s": prefill_s, "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "generate_s": total_s, "decode_s": decode_s,
        "decode_tokens_per_s": batch * new_tokens / decode_s,
        "decode_step_ms": 1e3 * decode_s / new_tokens,
        "compile_s": {"prefill": compile_prefill - prefill_s, "generate": compile_gen - total_s},
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        config, name = TINY.replace(attention_impl=args.attention), "tiny"
        batch_sizes, prompt_len, new_tokens = [2], 16, 8
    else:
        name = args.preset
        config = PRESETS[name].replace(param_dtype=args.dtype, attention_impl=args.attention)
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        prompt_len, new_tokens = args.prompt_len, args.new_tokens
    model = init_model(config, seed=args.seed)
    graphdef, params = nnx.split(model)
    del model

    results = []
    for batch in tqdm(batch_sizes, desc=f"bench {name}", unit="batch size"):
        r = bench_one(graphdef, params, config, batch, prompt_len, new_tokens,
                      args.repeats, args.seed)
        ideal = roofline(config, batch, prompt_len + new_tokens / 2, args.hbm_gbps)
        full = roofline(config, batch, prompt_len + new_tokens, args.hbm_gbps)
        r["roofline"] = {"mean_context": ideal, "full_cache": full}
        r["fraction_of_roofline"] = r["decode_tokens_per_s"] / ideal["tokens_per_s"]
        results.append(r)

    header = (f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'step ms':>8} "
              f"{'roofline tok/s':>15} {'roof step ms':>12} {'% roof':>7}")
    print(f"\n{name}: {config.num_params() / 1e6:.1f}M params, {config.param_dtype}, "
          f"prompt {prompt_len}, {new_tokens} new tokens, HBM {args.hbm_gbps:g} GB/s")
    print(header)
    for r in results:
        roof = r["roofline"]["mean_context"]
        print(f"{r['batch']:>5} {r['prefill_tokens_per_s']:>14.0f} "
              f"{r['decode_tokens_per_s']:>13.1f} {r['decode_step_ms']:>8.2f} "
              f"{roof['tokens_per_s']:>15.1f} {roof['step_ms']:>12.3f} "
              f"{100 * r['fraction_of_roofline']:>6.1f}%")

    report = {
        "benchmark": "bench_sampler",
        "model": name,
        "config": {k: (v if not hasattr(v, "__dataclass_fields__") else str(v))
                   for k, v in config.__dict__.items()},
        "num_params": config.num_params(),
        "device": jax.devices()[0].device_kind,
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git_commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "hbm_gbps": args.hbm_gbps,
        "results": results,
    }
    out = args.out
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           f"bench_sampler_{name}_{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
