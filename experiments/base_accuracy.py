"""Greedy accuracy of a model on a built-in task, by the GRPO trainer's own evaluation.

Loads the model with :func:`sparsejax.models.load_hf` and its tokenizer with
``transformers.AutoTokenizer`` from the same folder, reads the task's evaluation split
as :func:`sparsejax.data.presets.load_task_split` does (the preset's instruction, or
``--instruction``), renders each prompt through the chat template as the ``grpo`` command
does, and scores greedy completions (``eval_temperature=0``) with
:meth:`sparsejax.trainers.GRPOTrainer.evaluate` and the task's reward, ``--batch-size``
prompts at a time (a progress bar shows the running accuracy). What a GRPO run's step-0
evaluation on the same task would report, without training anything.

Writes JSON (``--out``): model, task, n, accuracy, max_new_tokens, per-template accuracy
(tasks whose rows name a ``template``), mean completion length, a few completions, wall
time, date, commit, versions, command, and ``--note``.

Example::

    python experiments/base_accuracy.py --model ~/.cache/sparsejax/SmolLM2-135M-Instruct-Q4_1 \\
        --task arithmetic --max-new-tokens 64 --out runs/base_accuracy.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time

from sparsejax.data.presets import TASKS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="local model folder (config.json, safetensors, tokenizer, chat template)")
    p.add_argument("--task", choices=tuple(TASKS), default="arithmetic", help="built-in task")
    p.add_argument("--split", choices=("eval", "train"), default="eval",
                   help="which split of the task (default eval)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N problems")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion budget (default 64)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="prompts decoded at once (default 64)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter dtype (default float32)")
    p.add_argument("--instruction", default=None,
                   help="text after each question (default: the task's)")
    p.add_argument("--system-prompt", default=None, help="optional system message")
    p.add_argument("--samples", type=int, default=8,
                   help="completions kept in the JSON (default 8)")
    p.add_argument("--note", default=None, help="free text stored in the JSON")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    for name in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not os.path.isfile(os.path.join(os.path.expanduser(args.model), "config.json")):
        p.error(f"--model {args.model}: no config.json there (a local model folder is needed)")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: its folder does not exist")
    return args


class RecordingReward:
    """The task's reward, keeping every (completion, answer, reward) it scores."""

    def __init__(self, reward):
        self.reward, self.rows = reward, []

    def __call__(self, completions, answers, **kwargs):
        values = self.reward(completions, answers, **kwargs)
        self.rows.extend(zip(completions, answers, values, strict=True))
        return values


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import flax
    import jax
    import transformers
    from flax import nnx
    from transformers import AutoTokenizer

    from sparsejax import rewards
    from sparsejax.config import GRPOConfig, TrainableConfig
    from sparsejax.data.dataset import read_prompt_data, render_prompts
    from sparsejax.data.presets import get_task, split_source
    from sparsejax.models import load_hf
    from sparsejax.rewards.arguments import RESERVED_ARGUMENTS
    from sparsejax.runs import provenance
    from sparsejax.trainers import GRPOTrainer

    preset = get_task(args.task)
    instruction = preset.instruction if args.instruction is None else args.instruction
    spec = preset.eval if args.split == "eval" else preset.train
    # What load_task_split reads, with the rows' other columns (e.g. "template") kept.
    data = read_prompt_data(split_source(spec), config=spec.config, split=spec.split,
                            prompt_field=spec.prompt_field, answer_field=spec.answer_field,
                            system_prompt=args.system_prompt, instruction=instruction or None,
                            limit=args.limit)
    model_dir = os.path.expanduser(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    graphdef, params = nnx.split(load_hf(model_dir, param_dtype=args.dtype))
    texts = render_prompts(data.messages, tokenizer)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    answers = list(data.answers)
    if args.task == "gsm8k":  # as the grpo command reads them (sparsejax.cli.tasks.load_data)
        from sparsejax.data.gsm8k import parse_gold_answer
        answers = [parse_gold_answer(a) if "####" in a else a for a in answers]
    columns = {k: v for k, v in data.columns.items() if k not in RESERVED_ARGUMENTS}
    stop = sorted({tokenizer.eos_token_id, *nnx.merge(graphdef, params).config.eos_token_ids}
                  - {None})
    reward = RecordingReward(rewards.reward_from_specs(preset.reward))
    config = GRPOConfig(max_new_tokens=args.max_new_tokens, eval_temperature=0.0,
                        eval_batch_size=args.batch_size, beta=0.0, seed=0)
    n = len(prompt_ids)
    print(f"{n} problems of {args.task} ({args.split}), greedy, max_new_tokens "
          f"{args.max_new_tokens}, batch {args.batch_size}", file=sys.stderr)
    t_eval = time.perf_counter()
    lengths = []
    with tempfile.TemporaryDirectory() as tmp:
        # Only evaluate() runs: the trainable (a sparse one: small state) is never stepped.
        trainer = GRPOTrainer(graphdef, params, tokenizer, reward, config,
                              TrainableConfig(sparsity=0.999), tmp, stop_token_ids=stop)
        from tqdm import tqdm
        bar = tqdm(total=n, disable=args.no_progress, unit="problem", file=sys.stderr)
        for start in range(0, n, args.batch_size):
            stop_at = min(n, start + args.batch_size)
            record = trainer.evaluate(prompt_ids[start:stop_at], answers[start:stop_at],
                                      {k: v[start:stop_at] for k, v in columns.items()})
            lengths.append((record["eval_completion_length"], stop_at - start))
            bar.update(stop_at - start)
            correct = sum(r >= 1.0 for _, _, r in reward.rows)
            bar.set_postfix(accuracy=f"{correct / len(reward.rows):.3f}")
        bar.close()
    eval_s = time.perf_counter() - t_eval
    scores = [float(r) for _, _, r in reward.rows]
    accuracy = sum(s >= 1.0 for s in scores) / n
    result = {
        "model": os.path.basename(os.path.normpath(model_dir)), "model_dir": model_dir,
        "task": args.task, "split": args.split, "n": n, "accuracy": accuracy,
        "correct": int(sum(s >= 1.0 for s in scores)), "reward": preset.reward,
        "instruction": instruction, "system_prompt": args.system_prompt,
        "decoding": "greedy", "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "dtype": args.dtype,
        "mean_completion_tokens": sum(m * k for m, k in lengths) / n,
        "eval_s": round(eval_s, 1), "wall_s": round(time.perf_counter() - t_start, 1),
    }
    if "template" in data.columns:
        by = collections.defaultdict(list)
        for name, s in zip(data.columns["template"], scores, strict=True):
            by[name].append(s >= 1.0)
        result["per_template"] = {k: {"n": len(v), "accuracy": round(sum(v) / len(v), 4)}
                                  for k, v in by.items()}
    result["samples"] = [{"prompt": texts[i], "completion": c, "answer": str(a), "reward": r}
                         for i, (c, a, r) in enumerate(reward.rows[:args.samples])]
    result.update({
        "note": args.note, "date": datetime.date.today().isoformat(),
        "git_commit": provenance.git_commit(short=True),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": flax.__version__, "transformers": transformers.__version__},
        "device": f"{jax.devices()[0].platform} ({jax.device_count()} device(s), "
                  f"{os.cpu_count()} CPU cores)",
        "command": "python " + " ".join(shlex.quote(a) for a in
                                        ["experiments/base_accuracy.py", *sys.argv[1:]]),
    })
    print(f"{args.task}: greedy accuracy {accuracy:.4f} ({result['correct']}/{n}), "
          f"mean completion {result['mean_completion_tokens']:.1f} tokens, "
          f"{eval_s:.0f} s evaluating, {result['wall_s']:.0f} s in all")
    if "per_template" in result:
        print("  " + ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in result["per_template"].items()))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
