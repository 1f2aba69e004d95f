"""Benchmark: whole GRPO steps, TRL's ``GRPOTrainer`` against sparsejax, on one machine.

The arms train the same model on the same chat-templated GSM8K prompts (same order), with
the same group shape, completion budget, temperature, loss and micro-batch, one optimizer
step per generation batch, and the same reward function:

* ``trl``: TRL's ``GRPOTrainer`` (torch AdamW, transformers ``generate``), full finetuning;
* ``sparse``: sparsejax at ``--sparsity`` (default 0.99), random per-tensor mask;
* ``full``: sparsejax full finetuning (dense AdamW).

With ``--rollouts`` it compares the sampling alone instead, on the same prompts:

* ``generate``: one batched transformers ``generate`` over all ``prompts x generations``
  left-padded rows (the fastest way a user calls transformers for a group);
* ``rollout``: the GRPO trainer's rollouts (shared prefill, decode slots) at the trainer's
  default settings.

Each arm runs ``--steps`` steps; the first (compilation, warm-up) is reported apart and
the rest are timed. Prints, per arm, the whole step, its sampling, the rest (scoring,
forward/backward, optimizer), compilation, and completion tokens per second of whole
steps, then each sparsejax arm's ratio to TRL. Writes JSON (device, versions, date,
commit, command) to ``--out`` (default under ``runs/benchmarks/``).

On a GPU every arm runs there (TRL through torch's CUDA); ``--random-preset`` times a
model of a preset's shape with random weights (its completions run to the budget, the
prompts are the shipped demo task's), for a machine that has no checkpoint; add
``--no-skip`` there, since rewards without spread would let sparsejax skip every backward.

    sparsejax smollm2                                        # the real model, once
    python experiments/bench_grpo_step.py                    # SmolLM2-135M, 8 x 8 x 128
    python experiments/bench_grpo_step.py --tiny             # smoke run on the demo model
    python experiments/bench_grpo_step.py --random-preset SmolLM2-135M --dtype bfloat16 --no-skip
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ARMS = ("trl", "sparse", "full")
ROLLOUT_ARMS = ("generate", "rollout")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF checkpoint folder (default: `sparsejax smollm2`'s SmolLM2-135M)")
    p.add_argument("--random-preset", default=None, metavar="PRESET",
                   help="random weights in this preset's shape (e.g. SmolLM2-135M) instead "
                        "of --model, on the shipped demo task's prompts")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the model's dtype in every arm")
    p.add_argument("--gsm8k-dir", default=None,
                   help="folder with GSM8K train.jsonl (default: the hub's openai/gsm8k)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke mode: the shipped demo model and task, 2 steps of 4 x 4 x 8")
    p.add_argument("--arms", default=None,
                   help=f"comma-separated subset of {ARMS} (with --rollouts: {ROLLOUT_ARMS})")
    p.add_argument("--rollouts", action="store_true",
                   help="time the sampling alone: transformers' generate vs the rollouts")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--loss", default="dapo")
    p.add_argument("--steps", type=int, default=3, help="steps per arm (the first is warm-up)")
    p.add_argument("--sparsity", type=float, default=0.99)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--remat", default=None, help="sparsejax's remat (default: its default)")
    p.add_argument("--slots", type=int, default=None,
                   help="decode slots of the rollouts (default: the trainer's default)")
    p.add_argument("--no-skip", action="store_true",
                   help="run every micro-batch's forward/backward (no skip_zero_advantage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON result (default under runs/benchmarks/)")
    args = p.parse_args(argv)
    choices = ROLLOUT_ARMS if args.rollouts else ARMS
    args.arms = [a.strip() for a in (args.arms or ",".join(choices)).split(",") if a.strip()]
    if unknown := set(args.arms) - set(choices):
        p.error(f"--arms: unknown {sorted(unknown)}; choose from {choices}")
    if args.random_preset and (args.model or args.tiny):
        p.error("--random-preset replaces --model and --tiny; give one of them")
    if args.random_preset:
        from sparsejax.models.config import PRESETS
        if args.random_preset not in PRESETS:
            p.error(f"--random-preset: unknown {args.random_preset!r}; presets: "
                    f"{', '.join(sorted(PRESETS))}")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up)")
    if args.tiny:
        args.prompts, args.generations, args.max_new_tokens = 4, 4, 8
        args.micro_batch, args.steps = 8, 2
    return args


def load_task(args, work_dir: str):
    """``(model_dir, prompts, answers, reward)``: chat-templated prompt texts, gold answers
    and a reward ``(completions, answers) -> floats`` shared by every arm. A
    ``--random-preset`` checkpoint is written under ``work_dir``."""
    from transformers import AutoTokenizer
    if args.tiny or args.random_preset:
        from peak_memory import make_checkpoint

        from sparsejax.cli.tasks import DEMO_DIR
        from sparsejax.data.jsonl import read_jsonl
        from sparsejax.data.toy_task import reward_fn
        rows = read_jsonl(os.path.join(DEMO_DIR, "train.jsonl"))
        model_dir = DEMO_DIR if args.tiny else str(make_checkpoint(
            args.random_preset, args.dtype, DEMO_DIR, Path(work_dir) / args.random_preset))
        return model_dir, [r["prompt"] for r in rows], [r["answer"] for r in rows], reward_fn
    from sparsejax import rewards
    from sparsejax.data.gsm8k import load_gsm8k, with_prompts
    from sparsejax.models.smollm2 import smollm2_checkpoint
    model_dir = args.model or str(smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    need = args.prompts * args.steps
    data = with_prompts(load_gsm8k("train", data_dir=args.gsm8k_dir, limit=need), tokenizer)
    return model_dir, list(data["prompt"]), list(data["gold"]), rewards.get_reward("gsm8k")


def run_trl(args, model_dir, prompts, answers, reward, out_dir) -> dict:
    """TRL's GRPOTrainer, full finetuning; per-step wall times from a callback."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    gen_batch = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=out_dir, max_steps=args.steps, learning_rate=args.lr,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=gen_batch // args.micro_batch,
        num_generations=args.generations, max_completion_length=args.max_new_tokens,
        temperature=1.0, beta=0.0, loss_type=args.loss, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not cuda, bf16=cuda and args.dtype == "bfloat16",
        seed=args.seed, shuffle_dataset=False, disable_tqdm=True)

    def reward_func(completions, answer, **_):
        return [float(r) for r in reward(completions, answer)]

    data = datasets.Dataset.from_dict({"prompt": prompts[:gen_batch], "answer": answers[:gen_batch]})
    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * gen_batch)

    trainer = GRPOTrainer(model=model, reward_funcs=reward_func, args=config,
                          train_dataset=data, processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    del trainer, model
    if cuda:  # give the GPU memory back to the JAX arms
        torch.cuda.empty_cache()
    return {"step_s": times, "sample_s": [None] * len(times), "compile_s": [0.0] * len(times),
            "completion_tokens": tokens}


def run_sparsejax(args, arm, model_dir, prompts, answers, reward, out_dir) -> dict:
    """sparsejax's GRPOTrainer: ``arm`` is ``sparse`` or ``full``."""
    from flax import nnx
    from transformers import AutoTokenizer

    from sparsejax.config import GRPOConfig, TrainableConfig
    from sparsejax.models import load_hf
    from sparsejax.trainers import GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    graphdef, params = nnx.split(load_hf(model_dir, param_dtype=args.dtype))
    changes = {} if args.remat is None else {"remat": args.remat}
    config = GRPOConfig(
        steps=args.steps, prompts_per_step=args.prompts, num_generations=args.generations,
        max_new_tokens=args.max_new_tokens, temperature=1.0, beta=0.0, loss_type=args.loss,
        micro_batch_size=args.micro_batch,
        generation_batch_size=args.prompts * args.generations, seed=args.seed,
        eval_every=0, save_every=0, skip_zero_advantage=not args.no_skip, **changes)
    trainable = TrainableConfig(sparsity=args.sparsity if arm == "sparse" else 0.0,
                                learning_rate=args.lr)
    trainer = GRPOTrainer(graphdef, params, tokenizer, reward, config, trainable, out_dir)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    # The prompts in the order TRL reads them (no shuffling): step s takes block s.
    out = {"step_s": [], "sample_s": [], "compile_s": [], "completion_tokens": []}
    for step in range(args.steps):
        block = slice(step * args.prompts, (step + 1) * args.prompts)
        trainer.step = 0  # prompt_order(step 0) of a one-block dataset: the block in order
        trainer.generation = None  # a new block: sample it (not the last step's batch)
        record = trainer.train_step(prompt_ids[block], answers[block])
        out["step_s"].append(record["step_time"])
        out["sample_s"].append(record["generation_time"])
        out["compile_s"].append(record["compile_time"])
        out.setdefault("compiles", []).append(record["compiles"])
        out["completion_tokens"].append(record["completion_length"]
                                        * args.prompts * args.generations)
        out.setdefault("skipped_micro_batches", []).append(
            record.get("skipped_micro_batches", 0))
    return out


def run_generate(args, model_dir, prompts, out_dir) -> dict:
    """transformers' batched ``generate`` over every row of each step at once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    del out_dir
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
    out = {"step_s": [], "sample_s": [], "compile_s": [], "completion_tokens": []}
    for step in range(args.steps):
        rows = [p for p in prompts[step * args.prompts:(step + 1) * args.prompts]
                for _ in range(args.generations)]
        batch = tokenizer(rows, return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        start = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        completions = ids[:, batch["input_ids"].shape[1]:]
        # tokens up to and including the first EOS (the rest is padding)
        ended = (completions == tokenizer.eos_token_id).int().cumsum(1)
        useful = int(((ended == 0) | ((ended == 1) & (completions == tokenizer.eos_token_id)))
                     .sum())
        for k, v in (("step_s", seconds), ("sample_s", seconds), ("compile_s", 0.0),
                     ("completion_tokens", useful)):
            out[k].append(v)
    return out


def run_rollout(args, model_dir, prompts, out_dir) -> dict:
    """The GRPO trainer's rollouts at its default slot count, on the same prompts."""
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from sparsejax.config import GRPOConfig, TrainableConfig
    from sparsejax.generation.sampler import SamplingParams
    from sparsejax.models import load_hf
    from sparsejax.trainers import GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    graphdef, params = nnx.split(load_hf(model_dir, param_dtype=args.dtype))
    config = GRPOConfig(prompts_per_step=args.prompts, num_generations=args.generations,
                        max_new_tokens=args.max_new_tokens, micro_batch_size=args.micro_batch,
                        seed=args.seed)
    trainer = GRPOTrainer(graphdef, params, tokenizer, lambda c, a: [0.0] * len(c), config,
                          TrainableConfig(sparsity=0.99), out_dir)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0,
                              stop_token_ids=trainer.stop_token_ids)
    out = {"step_s": [], "sample_s": [], "compile_s": [], "completion_tokens": []}
    total = args.prompts * args.generations
    for step in range(args.steps):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"]
               for p in prompts[step * args.prompts:(step + 1) * args.prompts]]
        start = time.perf_counter()
        samples, cost = trainer._sample(
            ids, jax.random.key(step), sampling, num_samples=args.generations,
            num_slots=args.slots or min(config.generation_batch_size, total),
            prompts_per_call=len(ids))
        seconds = time.perf_counter() - start
        for k, v in (("step_s", seconds), ("sample_s", seconds),
                     ("compile_s", cost["compile_s"]),
                     ("completion_tokens", int(samples["mask"].sum()))):
            out[k].append(v)
    return out


def summarize(raw: dict) -> dict:
    timed = slice(1, None)  # the first step compiles and warms up
    step_s = raw["step_s"][timed]
    tokens = raw["completion_tokens"][timed]
    sample = [s for s in raw["sample_s"][timed] if s is not None]
    return {"first_step_s": raw["step_s"][0], "step_s_median": statistics.median(step_s),
            "sample_s_median": statistics.median(sample) if sample else None,
            "compile_s_first": raw["compile_s"][0],
            "compile_s_later": sum(raw["compile_s"][timed]),
            **({"compiles_first": raw["compiles"][0],
                "compiles_later": sum(raw["compiles"][timed])} if "compiles" in raw else {}),
            "completion_tokens_per_s": sum(tokens) / sum(step_s), "raw": raw}


def main(argv=None) -> int:
    args = parse_args(argv)
    import importlib.util
    needs_torch = {"trl", "generate"} & set(args.arms)
    missing = [m for m in ("torch", "trl" if "trl" in args.arms else None)
               if m and needs_torch and importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"error: the {'/'.join(sorted(needs_torch))} arm needs {' and '.join(missing)} "
                 "(pip install -e \".[dev]\"), or leave it out with --arms")
    # sparsejax's arms compile as its jobs do (remat kept on a CPU), before JAX starts;
    # on a GPU, JAX takes memory as it needs it, so torch's arms can run beside it
    from sparsejax.xla_flags import keep_optimization_barriers
    keep_optimization_barriers()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import tempfile

    from bench_optimizer import write_result

    work = tempfile.TemporaryDirectory()
    model_dir, prompts, answers, reward = load_task(args, work.name)
    need = args.prompts * args.steps
    if len(prompts) < need:
        sys.exit(f"error: {need} prompts needed, the task has {len(prompts)}")
    prompts, answers = prompts[:need], answers[:need]
    results = {}
    for arm in args.arms:
        print(f"--- {arm}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            if arm == "trl":
                raw = run_trl(args, model_dir, prompts, answers, reward, tmp)
            elif arm == "generate":
                raw = run_generate(args, model_dir, prompts, tmp)
            elif arm == "rollout":
                raw = run_rollout(args, model_dir, prompts, tmp)
            else:
                raw = run_sparsejax(args, arm, model_dir, prompts, answers, reward, tmp)
        results[arm] = summarize(raw)
        r = results[arm]
        print(f"{arm:>6}: step {r['step_s_median']:.2f} s (first {r['first_step_s']:.1f} s), "
              f"sampling {r['sample_s_median'] or float('nan'):.2f} s, "
              f"{r['completion_tokens_per_s']:.1f} completion tokens/s"
              + (f"; XLA compiles {r['compiles_first']} in the first step, "
                 f"{r['compiles_later']} later ({r['compile_s_later']:.1f} s)"
                 if "compiles_first" in r else ""), flush=True)
    baseline = "generate" if args.rollouts else "trl"
    if baseline in results:
        base = results[baseline]["completion_tokens_per_s"]
        for arm in results:
            if arm != baseline:
                results[arm][f"ratio_to_{baseline}"] = (
                    results[arm]["completion_tokens_per_s"] / base)
                print(f"{arm} / {baseline} (completion tokens/s of whole steps): "
                      f"{results[arm][f'ratio_to_{baseline}']:.2f}x")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["model_dir"] = (f"random weights, {args.random_preset}'s shape"
                             if args.random_preset else model_dir)
    name = "bench_grpo_rollouts" if args.rollouts else "bench_grpo_step"
    write_result({"benchmark": name, **environment(), "settings": settings, "arms": results},
                 args.out, name)
    work.cleanup()
    return 0


def environment() -> dict:
    """Device, versions, date, commit and command of this run."""
    import datetime
    import importlib.metadata
    import platform

    import jax

    from sparsejax.runs import provenance
    device = jax.devices()[0]
    versions = {"python": platform.python_version(), "jax": jax.__version__}
    for package in ("torch", "transformers", "trl"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"device": f"{device.platform}:{device.device_kind}", "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(), "versions": versions,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": provenance.git_commit(short=True),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}


if __name__ == "__main__":
    sys.exit(main())
