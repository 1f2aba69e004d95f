"""Measure the real peak memory (RSS) of the main job and compare it with the memory plan.

Memory does not depend on the weights' values, so a checkpoint shaped like a preset
(random weights from :func:`sparsejax.models.decoder.init_model`, written once with
``save_hf`` under ``--work-dir``) with the preset family's tokenizer measures what the
real model would. The main job (``experiments/grpo_gsm8k.py``) runs ``--steps`` steps in
a child process; its peak resident set (``getrusage`` of the child: the kernel's high-water
mark) is printed beside ``memory_plan.py``'s figure for the same shapes and written as
JSON (device, versions, date, commit, command).

    python experiments/peak_memory.py --tokenizer ../tokenizers/qwen2.5   # Qwen2.5-0.5B, full
    python experiments/peak_memory.py --tokenizer TOK --sparsity 0.99
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="Qwen2.5-0.5B", help="model shape (memory_plan presets)")
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder of the preset's family")
    p.add_argument("--gsm8k-dir", required=True, help="folder with GSM8K train.jsonl/test.jsonl")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sparsity", type=float, default=0.0)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--remat", default=None, help="the job's --remat (default: its default)")
    p.add_argument("--work-dir", default="runs/peak_memory",
                   help="where the checkpoint and the run go")
    p.add_argument("--out", default=None, help="JSON result (default under --work-dir)")
    return p.parse_args(argv)


def make_checkpoint(preset: str, dtype: str, tokenizer: str, folder: Path) -> Path:
    """A preset-shaped checkpoint with random weights (written once)."""
    if (folder / "config.json").is_file():
        return folder
    import dataclasses

    from transformers import AutoTokenizer

    from sparsejax.models import config as model_config
    from sparsejax.models import save_hf
    from sparsejax.models.decoder import init_model

    cfg = dataclasses.replace(model_config.preset(preset), param_dtype=dtype)
    save_hf(init_model(cfg, seed=0), folder, tokenizer=AutoTokenizer.from_pretrained(tokenizer))
    return folder


def run_job(args, model: Path, out_dir: Path) -> tuple[float, float, int]:
    """Runs the main job; returns (peak RSS bytes of the child, wall seconds, exit code)."""
    command = [sys.executable, str(HERE / "grpo_gsm8k.py"), "--model", str(model),
               "--dtype", args.dtype, "--data-dir", args.gsm8k_dir,
               "--sparsity", str(args.sparsity), "--prompts-per-step", str(args.prompts),
               "--num-generations", str(args.generations),
               "--max-new-tokens", str(args.max_new_tokens),
               "--micro-batch-size", str(args.micro_batch),
               "--generation-batch-size", str(args.prompts * args.generations),
               "--steps", str(args.steps), "--eval-every", "0", "--save-every", "0",
               "--out-dir", str(out_dir), "--overwrite", "--no-progress",
               # every micro-batch runs its forward/backward (a step's full footprint);
               # the final evaluation reads a few problems only
               "--no-skip-zero-advantage", "--eval-limit", str(args.prompts)]
    if args.remat:
        command += ["--remat", args.remat]
    start = time.perf_counter()
    code = subprocess.call(command)
    wall = time.perf_counter() - start
    # ru_maxrss: kilobytes on Linux, the largest child waited for.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return peak, wall, code


def planned_plan(args, run_config: dict) -> dict:
    """memory_plan.py's figures for the job's shapes (no sampler plan: the trainer's)."""
    from memory_plan import main as plan_main
    out = Path(args.work_dir) / "plan.json"
    plan_args = ["--preset", args.preset, "--dtype", args.dtype,
                 "--sparsity", str(args.sparsity or 0.99),
                 "--micro-batch-size", str(args.micro_batch),
                 "--prompts-per-step", str(args.prompts),
                 "--num-generations", str(args.generations),
                 "--generation-batch-size", str(args.prompts * args.generations),
                 "--completion-length", str(args.max_new_tokens),
                 "--remat", run_config.get("remat", "layer"), "--out", str(out)]
    if args.sparsity:
        plan_args.append("--no-dense")
    plan_main(plan_args)
    plans = json.loads(out.read_text())["plans"]
    return plans["dense AdamW"] if not args.sparsity else plans[f"sparse {args.sparsity:g}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    # The plan below compiles in this process as the job does in its own: with XLA's
    # optimization barriers kept on a CPU (before JAX starts).
    from sparsejax.xla_flags import keep_optimization_barriers
    keep_optimization_barriers()
    work = Path(args.work_dir)
    model = make_checkpoint(args.preset, args.dtype, args.tokenizer,
                            work / f"{args.preset}-{args.dtype}")
    peak, wall, code = run_job(args, model, work / "run")
    if code:
        print(f"error: the job exited with {code} (peak RSS {peak / GIB:.2f} GiB)",
              file=sys.stderr)
        return code
    config = {}
    config_file = work / "run" / "config.yaml"
    if config_file.is_file():
        import yaml
        config = yaml.safe_load(config_file.read_text()) or {}
    plan = planned_plan(args, config)
    planned = plan.get("total")
    print(f"{args.preset} {args.dtype}, sparsity {args.sparsity}: peak RSS "
          f"{peak / GIB:.2f} GiB (planned {planned / GIB:.2f} GiB, measured/planned "
          f"{peak / planned:.2f}); {wall:.0f} s, exit {code}")
    import jax

    from sparsejax.runs import provenance
    record = {
        "benchmark": "peak_memory", "device": f"{jax.devices()[0].platform}",
        "cpu_count": os.cpu_count(), "memory_total_bytes": os.sysconf("SC_PAGE_SIZE")
        * os.sysconf("SC_PHYS_PAGES"), "python": platform.python_version(),
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": provenance.git_commit(short=True),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "settings": vars(args), "exit_code": code, "wall_s": wall,
        "peak_rss_bytes": peak, "planned_total_bytes": planned,
        "measured_over_planned": peak / planned if planned else None,
        "job_config": config,
    }
    out = Path(args.out or work / "peak_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
