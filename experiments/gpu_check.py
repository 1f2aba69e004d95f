"""One command that validates and measures everything GPU-side: ``gpu_check.py``.

Runs, on one NVIDIA GPU, each part in its own process (killed at its timeout, so a hang
cannot eat the budget; a part that fails does not stop the others):

* ``env``: devices, memory, jax/jaxlib/CUDA/cuDNN versions, compute capability, the
  copy bandwidth and bf16 matmul rate measured here (the ceilings of later parts);
* ``tests``: ``pytest -m gpu`` (compiled Pallas kernels vs XLA and optax, cuDNN vs XLA
  attention);
* ``optimizer``: optax.adamw vs the fused sparse step (xla; pallas one launch per
  tensor and batched) on Qwen2.5-0.5B/1.5B and Llama-3.1-8B shapes at 1% and 0.1%,
  achieved bandwidth by the touched-sector model of ``kernels/README.md``;
* ``sampler``: ``bench_sampler.py`` on Qwen2.5-0.5B shapes, tokens/s vs its HBM floor;
* ``grpo``: two steps of the real GRPO trainer on random-init Qwen2.5-0.5B (8 prompts x
  8 samples, 256 new tokens), time per phase and peak memory, sparse 99% and full
  finetuning each in its own process;
* ``grpo_step``: ``bench_grpo_step.py``, whole GRPO steps of TRL's ``GRPOTrainer`` (when
  ``trl`` is installed) and sparsejax sparse 99% and full, side by side, at the CPU
  benchmark's workload on a random SmolLM2-135M-shaped model in bfloat16;
* ``train_step``: ``bench_train_step.py`` (dense vs gather vs sparse backward).

Before anything starts, missing packages are reported by name. At the end the out
folder holds ``gpu_check.json`` and ``gpu_check.md`` (versions, date, commit, device,
one row per part, the parts' tables). Exit status: 0 when no part failed or timed out,
1 otherwise, 2 for bad flags or missing packages.

    python experiments/gpu_check.py                      # on the GPU machine, ~10 min
    python experiments/gpu_check.py --only env,tests     # a subset
    python experiments/gpu_check.py --tiny               # toy sizes on CPU (CI)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from sparsejax.runs import provenance

ROOT = Path(__file__).resolve().parents[1]

#: (name, timeout on a GPU in s, timeout with --tiny in s). ``grpo`` runs as two
#: processes (``grpo:sparse``, ``grpo:full``), each with this timeout.
PARTS = (("env", 60, 120), ("tests", 150, 240), ("optimizer", 170, 240),
         ("sampler", 110, 240), ("grpo", 110, 240), ("grpo_step", 240, 600),
         ("train_step", 110, 240))
PART_NAMES = tuple(p[0] for p in PARTS)
MIN_PART_S = 15  # a part is not started with less time than this left
#: importable name -> what to install. Checked by name before anything starts.
REQUIRED = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
            "orbax": "orbax-checkpoint", "chex": "chex", "transformers": "transformers",
            "safetensors": "safetensors", "tqdm": "tqdm", "numpy": "numpy",
            "pytest": "pytest", "sparsejax": "sparsejax (pip install --no-deps -e .)"}
GPU_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")
OPTIONAL = {"datasets": "datasets (hub datasets)", "tensorboardX": "tensorboardX "
            "(--report-to tensorboard)", "math_verify": "math-verify (math reward)",
            "hypothesis": "hypothesis (some CPU tests)", "torch": "torch (bench_sampler "
            "--hf rows)"}
HOOK = "SPARSEJAX_GPU_CHECK_HOOK"  # tests only: comma-separated "PART:hang" / "PART:fail"


def missing_packages(required: dict[str, str]) -> list[str]:
    """What to install for each importable name in ``required`` that is not found."""
    return [pip for mod, pip in required.items() if importlib.util.find_spec(mod) is None]


def gpu_plugin_installed() -> bool:
    import importlib.metadata
    for name in GPU_PLUGINS:
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def check_sparsejax_import() -> tuple[str | None, str | None]:
    """(error, warning): whether sparsejax with ``sparsejax.kernels`` imports, and from where.

    The error says why the import failed; the warning, that it imports from another
    folder than this checkout (a non-editable install: its code is what gets checked).
    Run in a child process on the CPU platform, so this process never touches the GPU.
    """
    code = ("import sparsejax, sparsejax.kernels.indexed_adamw, sparsejax.trainers, "
            "sparsejax.generation.rollouts; print(sparsejax.__file__); "
            "print(sparsejax.kernels.indexed_adamw.__file__)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=180, check=False)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["?"])[-1]
        return (f"importing sparsejax failed: {last} (install this checkout: pip install "
                "--no-index --no-deps --no-build-isolation -e .)"), None
    files = [Path(p).resolve() for p in run.stdout.split()]
    if files != [ROOT / "sparsejax" / "__init__.py", ROOT / "kernels" / "indexed_adamw.py"]:
        return None, (f"sparsejax imports from {files[0].parent}, not this checkout "
                      f"({ROOT}); that copy is what gets checked")
    return None, None


# ----------------------------------------------------------------------------- child


class PartContext:
    """What a part sees: sizes (``tiny``), its folder, earlier parts' results, its result."""

    def __init__(self, name: str, out: Path, tiny: bool, context: dict):
        self.name, self.out, self.tiny, self.context = name, out, tiny, context
        self.result = {"summary": "", "rows": [], "notes": []}
        self.path = out / "parts" / f"{name.replace(':', '_')}.json"

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.path)


def run_part_here(name: str, out: Path, tiny: bool) -> int:
    """Runs part ``name`` in this process; its result goes to ``out/parts/NAME.json``."""
    import gpu_check_parts as parts
    ctx_file = out / "parts" / "_context.json"
    context = json.loads(ctx_file.read_text()) if ctx_file.exists() else {}
    ctx = PartContext(name, out, tiny, context)
    ctx.flush()
    hooks = set(os.environ.get(HOOK, "").split(","))
    base, _, variant = name.partition(":")
    try:
        if {f"{name}:hang", f"{base}:hang"} & hooks:
            time.sleep(10**6)
        if {f"{name}:fail", f"{base}:fail"} & hooks:
            raise RuntimeError("failure injected by " + HOOK)
        fn = getattr(parts, f"run_{base}")
        fn(ctx, variant) if variant else fn(ctx)
    except Exception as e:
        ctx.result["error"] = f"{type(e).__name__}: {e}"
        ctx.result["traceback"] = traceback.format_exc()[-4000:]
        ctx.flush()
        return 1
    ctx.flush()
    return 0


# ----------------------------------------------------------------------------- parent


def plan(only: list[str] | None) -> list[str]:
    """Processes to run, in order (``grpo`` is two)."""
    names = []
    for name in PART_NAMES:
        if only is not None and name not in only:
            continue
        names += ["grpo:sparse", "grpo:full"] if name == "grpo" else [name]
    return names


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(name: str, out: Path, tiny: bool, timeout: float) -> dict:
    """Runs one part in its own process group; returns its record (status, seconds, ...)."""
    log = out / "logs" / f"{name.replace(':', '_')}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-part", name,
           "--out", str(out)] + (["--tiny"] if tiny else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tiny:
        env.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timeout"
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
    tail = log.read_text(errors="replace").strip().splitlines()[-20:]
    return collect(name, out, status, rc, time.perf_counter() - t0, timeout, tail)


def run_in_process(name: str, out: Path, tiny: bool) -> dict:
    """Runs one part in this process (``--in-process``, for tests): no timeout, no isolation."""
    t0 = time.perf_counter()
    rc = run_part_here(name, out, tiny)
    return collect(name, out, "ok" if rc == 0 else "failed", rc, time.perf_counter() - t0,
                   None, [])


def collect(name: str, out: Path, status: str, rc: int | None, seconds: float,
            timeout: float | None, tail: list[str]) -> dict:
    """A part's record: how it ended and what it left in ``out/parts/NAME.json``."""
    path = out / "parts" / f"{name.replace(':', '_')}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        result = {"summary": "", "rows": [], "notes": []}
    if status == "ok" and result.get("status_hint") == "skipped":
        status = "skipped"
    if status in ("failed", "timeout"):
        result["log_tail"] = tail
        if status == "timeout":
            result["summary"] = (f"killed after {timeout:.0f} s; partial: "
                                 + (result.get("summary") or f"{len(result['rows'])} rows"))
        else:
            why = (result.get("error") or (tail[-1] if tail else f"exit {rc}")).splitlines()[0]
            result["summary"] = "; ".join(x for x in (result.get("summary"), why[:300]) if x)
    return {"part": name, "status": status, "seconds": round(seconds, 1),
            "timeout_s": None if timeout is None else round(timeout, 1), "exit_code": rc,
            **result}


def write_report(out: Path, meta: dict, records: list[dict]) -> tuple[Path, Path]:
    from gpu_check_report import markdown
    js = out / "gpu_check.json"
    js.write_text(json.dumps({**meta, "parts": records}, indent=2, default=str) + "\n")
    md = out / "gpu_check.md"
    md.write_text(markdown(meta, records))
    return js, md


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Parts: " + ", ".join(PART_NAMES) + ". See the module docstring.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default "
                        "runs/gpu_check_<device kind>_<UTC time>)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget for all parts (default 560; 1200 with --tiny)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated parts to run, of {','.join(PART_NAMES)}")
    parser.add_argument("--tiny", action="store_true",
                        help="toy sizes on CPU; what needs a GPU is skipped and said so")
    parser.add_argument("--timeout", action="append", default=[], metavar="PART=S",
                        help="override one part's timeout in seconds (repeatable)")
    parser.add_argument("--run-part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only is not None:
        args.only = [p.strip() for p in args.only.split(",") if p.strip()]
        bad = [p for p in args.only if p not in PART_NAMES]
        if bad or not args.only:
            parser.error(f"--only: unknown part(s) {bad or args.only!r}; parts are "
                         f"{','.join(PART_NAMES)}")
    if args.in_process and not args.tiny:
        parser.error("--in-process is for --tiny test runs; a GPU run isolates its parts")
    if args.budget_s is None:
        args.budget_s = 1200.0 if args.tiny else 560.0
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    overrides = {}
    for item in args.timeout:
        name, _, value = item.partition("=")
        try:
            overrides[name] = float(value)
        except ValueError:
            parser.error(f"--timeout {item!r}: expected PART=SECONDS")
        if name not in PART_NAMES or overrides[name] <= 0:
            parser.error(f"--timeout {item!r}: PART is one of {','.join(PART_NAMES)}, "
                         "SECONDS > 0")
    args.timeouts = overrides
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_part:
        return run_part_here(args.run_part, Path(args.out), args.tiny)
    t_start = time.perf_counter()
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    missing = missing_packages(REQUIRED)
    if not args.tiny and not gpu_plugin_installed():
        missing.append(" or ".join(GPU_PLUGINS) + " (JAX's CUDA plugin)")
    if missing:
        print("gpu_check: missing packages: " + ", ".join(missing)
              + " (offline install: see docs/gpu.md)", file=sys.stderr)
        return 2
    why, warning = check_sparsejax_import()
    if why:
        print(f"gpu_check: {why}", file=sys.stderr)
        return 2
    if warning:
        print(f"gpu_check: warning: {warning}", file=sys.stderr)
    optional = [pip for mod, pip in OPTIONAL.items() if importlib.util.find_spec(mod) is None]
    stamp = datetime.datetime.now(datetime.UTC)
    out = Path(args.out) if args.out else (
        Path("runs") / f"gpu_check_{'tiny' if args.tiny else 'gpu'}_"
        f"{stamp:%Y%m%d-%H%M%S}")
    for sub in ("parts", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "parts" / "_context.json").write_text("{}")
    meta = {"benchmark": "gpu_check", "mode": "tiny (CPU)" if args.tiny else "gpu",
            "date": stamp.isoformat(timespec="seconds"), "commit": provenance.git_commit(),
            "command": "python " + " ".join([os.path.relpath(__file__, ROOT)]
                                            + (argv if argv is not None else sys.argv[1:])),
            "budget_s": args.budget_s, "missing_optional": optional,
            "sparsejax_warning": warning}
    names = plan(args.only)
    timeouts = {p[0]: (p[2] if args.tiny else p[1]) for p in PARTS}
    timeouts.update(args.timeouts)
    print(f"gpu_check ({meta['mode']}): {len(names)} parts, budget {args.budget_s:.0f} s, "
          f"out {out}" + (f"; optional packages missing: {', '.join(optional)}"
                          if optional else ""), flush=True)
    records, context = [], {}
    for i, name in enumerate(names, 1):
        left = args.budget_s - (time.perf_counter() - t_start)
        allowed = left - MIN_PART_S * (len(names) - i)  # keep a minimum for later parts
        wanted = timeouts[name.partition(":")[0]]
        timeout = min(wanted, allowed)
        tag = f"[{i}/{len(names)}] {name:<12}"
        if allowed < min(wanted, MIN_PART_S):
            rec = {"part": name, "status": "skipped", "seconds": 0.0,
                   "summary": f"no budget left ({left:.0f} s of {args.budget_s:.0f} s)"}
        elif (not args.tiny and context.get("env", {}).get("device", {}).get("platform")
              not in (None, "gpu")):
            rec = {"part": name, "status": "skipped", "seconds": 0.0,
                   "summary": "JAX sees no GPU (see env); use --tiny on a CPU"}
        else:
            print(f"{tag} running (timeout {timeout:.0f} s)", flush=True)
            rec = (run_in_process(name, out, args.tiny) if args.in_process
                   else run_child(name, out, args.tiny, timeout))
        print(f"{tag} {rec['status']:<8} {rec['seconds']:>6.1f} s  {rec['summary']}",
              flush=True)
        records.append(rec)
        if name == "env" and rec["status"] == "ok":
            context["env"] = {k: rec.get(k) for k in ("device", "copy_gbps",
                                                      "matmul_bf16_tflops", "versions")}
            (out / "parts" / "_context.json").write_text(json.dumps(context, default=str))
    env = next((r for r in records if r["part"] == "env"), {})
    meta.update(device=env.get("device"), versions=env.get("versions"), cuda=env.get("cuda"),
                total_s=round(time.perf_counter() - t_start, 1))
    if not args.tiny and "env" in names and env.get("device", {}) and \
            env["device"].get("platform") != "gpu":
        records.append({"part": "gpu", "status": "failed", "seconds": 0.0,
                        "summary": "JAX sees no GPU: nothing GPU-side was checked"})
    js, md = write_report(out, meta, records)
    bad = [r["part"] for r in records if r["status"] in ("failed", "timeout")]
    print(f"gpu_check: {len(records)} parts in {meta['total_s']:.0f} s; "
          + (f"FAILED: {', '.join(bad)}" if bad else "no failures")
          + f"; wrote {js} and {md}", flush=True)
    print(md.read_text().split("\n## ")[0].rstrip())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
