"""Digests of the trained weights of short GRPO and DPO runs, to check a change of code
leaves training bit-identical.

Runs, on the shipped demo model (float32, CPU, nothing downloaded), GRPO with a 99%-sparse
mask, with full finetuning and with a LoRA adapter, and DPO (sparse and full) on
preference pairs made from the demo task (the gold sum chosen, the sum + 1 rejected), each
through the documented scripts; then prints and writes one SHA-256 per run over the
bytes of every tensor of ``final_model/`` (sorted by name).

    python experiments/params_digest.py --out runs/params_digest.json
    python experiments/params_digest.py --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = "4"
COMMON = ["--steps", STEPS, "--save-every", "2", "--eval-every", "0", "--no-progress",
          "--backend", "xla"]
GRPO = ["--demo", "--prompts-per-step", "8", "--num-generations", "4",
        "--micro-batch-size", "16", "--eval-limit", "16"]
RUNS = {
    "grpo_sparse": ("grpo.py", GRPO + ["--sparsity", "0.99"]),
    "grpo_full": ("grpo.py", GRPO + ["--sparsity", "0", "--lr", "1e-3"]),
    "grpo_lora": ("grpo.py", GRPO + ["--adapter", "lora", "--lora-rank", "4"]),
    "dpo_sparse": ("dpo.py", ["--sparsity", "0.9", "--lr", "3e-2"]),
    "dpo_full": ("dpo.py", ["--sparsity", "0", "--lr", "1e-3"]),
}


def demo_dir() -> str:
    import importlib.util
    return os.path.join(importlib.util.find_spec("sparsejax").submodule_search_locations[0],
                        "demo")


def write_pairs(folder: str) -> str:
    """``train.jsonl`` of preference pairs from the demo task."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(demo_dir(), "train.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:16]
    with open(os.path.join(folder, "train.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"], "chosen": r["answer"],
                                "rejected": str(int(r["answer"]) + 1)}) + "\n")
    return folder


def digest(model_dir: str) -> str:
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="JSON file of the digests")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="compare two JSON files of digests instead (exit 1 if they differ)")
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (json.load(open(p, encoding="utf-8"))["digests"] for p in args.compare)
        same = {k: a.get(k) == b.get(k) for k in sorted(set(a) | set(b))}
        print(json.dumps(same, indent=2))
        return 0 if all(same.values()) else 1
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = write_pairs(os.path.join(tmp, "pairs"))
        for name, (script, flags) in RUNS.items():
            run_dir = os.path.join(tmp, name)
            extra = [] if script == "grpo.py" else [
                "--model", demo_dir(), "--dataset", pairs, "--dtype", "float32",
                "--batch-size", "4", "--micro-batch-size", "2", "--max-prompt-length", "16",
                "--max-completion-length", "4", "--eval-split", ""]
            cmd = [sys.executable, os.path.join(HERE, script), *flags, *extra, *COMMON,
                   "--out-dir", run_dir]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            out[name] = digest(os.path.join(run_dir, "final_model"))
            print(name, out[name], flush=True)
    if args.out:
        import datetime
        import platform

        import jax

        from sparsejax.runs import provenance
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        record = {"digests": out, "steps": int(STEPS), "runs": {k: v[1] for k, v in RUNS.items()},
                  "commit": provenance.git_commit(),
                  "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "device": jax.devices()[0].device_kind, "cpu": platform.processor(),
                  "versions": {"python": platform.python_version(), "jax": jax.__version__},
                  "command": " ".join(["python", *sys.argv])}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
