"""GRPO on any dataset and reward, with sparse (default: 1% of the weights) or full finetuning.

The data are prompts with gold answers: a built-in task (``--task gsm8k|math``), a hub
dataset (``--dataset ID`` with ``--dataset-config`` / ``--split``) or a local JSON Lines /
JSON / Parquet file (``--dataset file.jsonl``), with the question in ``--prompt-field`` (or
chat turns in ``--messages-field``) and the gold in ``--answer-field``. The reward is one or
more ``--reward`` terms, summed with weights: built-ins (gsm8k, math, exact, format) or a
function ``module:function`` / ``path.py:function`` taking ``(completions, answers)``.
Defaults mirror the Multiple Ticket Hypothesis GSM8K run (``grpo_gsm8k.py`` is this script
with ``--task gsm8k``): Qwen2.5-0.5B-Instruct, 32 prompts x 16 samples, 100 steps, a random
99%-sparse mask, LR 1e-4.

    python experiments/grpo.py --demo                    # ~1 minute on a CPU, offline
    python experiments/grpo.py --task math               # MATH train, MATH-500 eval
    python experiments/grpo.py --dataset my_task.jsonl --prompt-field question \\
        --answer-field answer --reward exact --reward format=0.1
    python experiments/grpo.py --dataset my_task.jsonl --reward my_rewards.py:score \\
        --report-to jsonl,tensorboard
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (add_model_args, add_run_args, add_sparse_args,  # noqa: E402
                    check_jsonl, check_model_folder, check_number, check_numbers,
                    check_run_args, fail, flag, load_model_and_tokenizer, open_out_dir,
                    run_main, run_mesh, sparse_config, train_with_writer,
                    what_trains)
from lora_flags import (add_adapter_args, adapter_run_info, build_updater,  # noqa: E402
                        check_adapter_args)

TASK_NAMES = ("gsm8k", "math")  # sparsejax.data.presets.TASKS (a test checks they agree)
TASK_TITLES = {"gsm8k": "GSM8K", "math": "MATH"}
# Where the demo model and task ship (found without importing sparsejax, hence jax).
DEMO_DIR = os.path.join(importlib.util.find_spec("sparsejax").submodule_search_locations[0],
                        "demo")
DEMO_REWARD = "sparsejax.toy_task:reward_fn"
DEMO = {  # what --demo sets (any flag given beside it wins)
    "model": DEMO_DIR, "dataset": os.path.join(DEMO_DIR, "train.jsonl"),
    "eval_dataset": os.path.join(DEMO_DIR, "test.jsonl"), "instruction": "",
    "dtype": "float32", "remat": "none", "steps": 60, "prompts_per_step": 16,
    "num_generations": 8, "max_new_tokens": 5, "generation_batch_size": 128,
    "micro_batch_size": 128, "eval_every": 20, "eval_batch_size": 256, "save_every": 20,
    "lr": 1e-2, "out_dir": "runs/grpo_demo",
}


def build_parser(entry: dict[str, Any]) -> argparse.ArgumentParser:
    """The flags of an entry point: ``grpo.py`` (every data flag) or a task preset's
    script (``entry["task"]`` fixed; only ``--data-dir`` chooses its data)."""
    doc = entry["doc"]
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     epilog=doc.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    generic = entry.get("task") is None
    add_model_args(parser, "Qwen/Qwen2.5-0.5B-Instruct")
    data = parser.add_argument_group("data")
    if generic:
        data.add_argument("--demo", action="store_true",
                          help="the shipped toy addition model and task: the whole run "
                               "(rollouts, rewards, sparse steps, checkpoints, evaluation, "
                               "HF save, plot) in about a minute on a CPU, nothing downloaded")
        data.add_argument("--task", default=None, choices=TASK_NAMES,
                          help="a built-in task: its data, instruction and reward (default "
                               "gsm8k unless --dataset is given)")
        data.add_argument("--dataset", default=None,
                          help="training prompts: a hub dataset id or a local .jsonl/.json/"
                               ".parquet file (replaces the task's training data)")
        data.add_argument("--dataset-config", default=None, help="hub dataset configuration")
        data.add_argument("--split", default=None,
                          help="hub split of --dataset (default: train)")
        data.add_argument("--eval-dataset", default=None,
                          help="evaluation prompts (hub id or local file; default: the "
                               "task's, or --dataset's --eval-split, else no evaluation)")
        data.add_argument("--eval-split", default=None,
                          help="hub split to evaluate on (default: test with --eval-dataset)")
        data.add_argument("--prompt-field", default=None,
                          help="column of the question text (default: the task's, or prompt)")
        data.add_argument("--messages-field", default=None,
                          help="instead, a column of chat turns [{role, content}, ...]")
        data.add_argument("--answer-field", default=None,
                          help="column of the gold answer (default: the task's, or answer)")
        data.add_argument("--instruction", default=None,
                          help="text put on its own line after the question (default: ask "
                               "for the final answer in \\boxed{}; '' for none)")
    title = TASK_TITLES.get(entry.get("task"), "the task's")
    data.add_argument("--data-dir", default=None,
                      help=f"folder with {title} train.jsonl/test.jsonl (default: the hub)"
                      if not generic else "folder with the task's train.jsonl/test.jsonl "
                      "in its fields (default: the hub)")
    data.add_argument("--train-limit", type=int, default=None, help="use the first N problems")
    data.add_argument("--system-prompt", default=None, help="optional system message")
    data.add_argument("--reward", action="append", default=None, metavar="NAME[=WEIGHT]",
                      help="a reward term (repeat, or comma-separate, to sum several): gsm8k, "
                           "math, exact, format, module:function or path.py:function "
                           "(default: the task's)")
    grpo = parser.add_argument_group("GRPO")
    grpo.add_argument("--steps", type=int, default=100)
    grpo.add_argument("--prompts-per-step", type=int, default=32)
    grpo.add_argument("--num-generations", type=int, default=16, help="samples per prompt")
    grpo.add_argument("--max-new-tokens", type=int, default=1024,
                      help="completion budget of training samples")
    grpo.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    grpo.add_argument("--top-p", type=float, default=1.0)
    grpo.add_argument("--top-k", type=int, default=0)
    grpo.add_argument("--generation-batch-size", type=int, default=128,
                      help="sequences sampled at once")
    grpo.add_argument("--micro-batch-size", type=int, default=8,
                      help="sequences per forward/backward pass (gradients accumulate)")
    grpo.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    grpo.add_argument("--advantage-scale", default="none", choices=["none", "group", "batch"],
                      help="divide (reward - group mean) by the group/batch std, or not (paper)")
    grpo.add_argument("--beta", type=float, default=0.0, help="KL coefficient (k3 estimator)")
    grpo.add_argument("--epsilon", type=float, default=0.2, help="clip range")
    grpo.add_argument("--epsilon-high", type=float, default=None, help="upper clip (DAPO)")
    grpo.add_argument("--kl-bias-correction", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="multiply the per-token KL by the importance ratio (TRL's "
                           "use_bias_correction_kl; on by default, as in TRL)")
    grpo.add_argument("--top-entropy-quantile", type=float, default=1.0,
                      help="policy gradient on this top fraction of entropy tokens (0.2: 80/20)")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-every", type=int, default=25, help="0: only at the end")
    ev.add_argument("--eval-limit", type=int, default=None,
                    help="evaluate on the first N test problems (default: all)")
    ev.add_argument("--eval-temperature", type=float, default=0.0,
                    help="0: greedy; the paper also reports T=0.9")
    ev.add_argument("--eval-batch-size", type=int, default=64)
    ev.add_argument("--eval-max-new-tokens", type=int, default=None,
                    help="completion budget of evaluation (default: --max-new-tokens)")
    add_sparse_args(parser, default_lr=None)
    add_adapter_args(parser)
    add_run_args(parser, entry.get("out_dir") or "runs/grpo_<task>")
    return parser


def parse_args(argv=None, entry: dict[str, Any] | None = None) -> argparse.Namespace:
    entry = entry or ENTRY
    parser = build_parser(entry)
    args = parser.parse_args(argv)
    if getattr(args, "demo", False):
        parser.set_defaults(**DEMO)
        args = parser.parse_args(argv)
    for name in ("demo", "task", "dataset", "dataset_config", "split", "eval_dataset",
                 "eval_split", "prompt_field", "messages_field", "answer_field", "instruction"):
        if not hasattr(args, name):
            setattr(args, name, entry.get(name))
    if args.task is None and args.dataset is None:
        args.task = "gsm8k"
    if args.out_dir == "runs/grpo_<task>":
        args.out_dir = f"runs/grpo_{args.task}" if args.task else "runs/grpo"
    if args.demo and args.reward is None:
        args.reward = [DEMO_REWARD]
    return args


def check_args(args: argparse.Namespace) -> None:
    """Every flag, the model folder and the data files, before anything heavy."""
    for name in ("steps", "prompts_per_step", "max_new_tokens", "generation_batch_size",
                 "micro_batch_size", "eval_batch_size", "train_limit", "eval_limit",
                 "eval_max_new_tokens"):
        check_number(args, name, low=1)
    check_number(args, "num_generations", low=2)
    for name in ("top_k", "eval_every"):
        check_number(args, name, low=0)
    check_numbers(args, {"temperature": (0.0, None, True), "top_p": (0.0, 1.0, True),
                         "beta": (0.0, None), "epsilon": (0.0, None, True),
                         "epsilon_high": (0.0, None, True),
                         "top_entropy_quantile": (0.0, 1.0, True),
                         "eval_temperature": (0.0, None)})
    check_run_args(args)
    check_adapter_args(args)
    check_model_folder(args)
    if args.dataset is not None and args.data_dir is not None:
        raise ValueError("--dataset and --data-dir exclude each other (--data-dir holds a "
                         "task's train.jsonl/test.jsonl)")
    if args.messages_field is not None and args.prompt_field is not None:
        raise ValueError("--messages-field and --prompt-field exclude each other")
    if args.task is None and not args.reward:
        raise ValueError("--dataset without --task needs --reward (gsm8k, math, exact, format, "
                         "module:function or path.py:function)")
    if args.data_dir is not None:
        from sparsejax.data.presets import get_task  # pylint: disable=g-import-not-at-top
        preset = get_task(args.task)
        for split, spec in (("train", preset.train), ("test", preset.eval)):
            path = os.path.join(args.data_dir, f"{split}.jsonl")
            if not os.path.isfile(path):
                raise ValueError(f"cannot load {TASK_TITLES[args.task]}: --data-dir "
                                 f"{args.data_dir!r} has no {split}.jsonl")
            fields = (args.messages_field or args.prompt_field or spec.prompt_field,
                      args.answer_field or spec.answer_field)
            check_jsonl(path, required=fields)


def reward_specs(args: argparse.Namespace) -> list[str]:
    """``--reward`` as given, else the task's reward."""
    if args.reward:
        return list(args.reward)
    from sparsejax.data.presets import get_task  # pylint: disable=g-import-not-at-top
    return [get_task(args.task).reward]


def build_reward(specs: list[str]) -> Any:
    """One :class:`~sparsejax.rewards.CombinedReward` of the ``--reward`` values; a user
    function's term is named after the function (its metric: ``reward/<function>``)."""
    from sparsejax import rewards  # pylint: disable=g-import-not-at-top
    terms = [rewards.parse_reward_spec(s) for v in specs for s in v.split(",") if s.strip()]
    if not terms:
        raise ValueError("--reward: no reward given")
    try:
        return rewards.combine_rewards([(name if name in rewards.REWARDS
                                         else rewards.get_reward(name), weight)
                                        for name, weight in terms])
    except ImportError as e:  # the math reward without math-verify
        raise ValueError(f"--reward: {e}") from None


def data_sources(args: argparse.Namespace) -> dict[str, dict[str, Any] | None]:
    """``{"train": kwargs, "eval": kwargs or None}`` for :func:`load_prompt_dataset`."""
    from sparsejax.data.gsm8k import BOXED_INSTRUCTION  # pylint: disable=g-import-not-at-top
    from sparsejax.data.presets import get_task  # pylint: disable=g-import-not-at-top
    preset = get_task(args.task) if args.task else None
    instruction = args.instruction
    if instruction is None:
        instruction = preset.instruction if preset else BOXED_INSTRUCTION

    def spec(which: str, source: str | None, config: str | None, split: str | None):
        base = None if preset is None else (preset.train if which == "train" else preset.eval)
        if source is None:  # the task's own data: the hub, or --data-dir
            if args.data_dir is not None:
                source = os.path.join(args.data_dir, f"{'train' if which == 'train' else 'test'}"
                                                     ".jsonl")
            else:
                source, config = base.source, base.config
            split = split or base.split
        return {"source": source, "config": config,
                "split": split or ("train" if which == "train" else "test"),
                "prompt_field": args.prompt_field or (base.prompt_field if base else None),
                "answer_field": args.answer_field or (base.answer_field if base else "answer"),
                "messages_field": args.messages_field, "system_prompt": args.system_prompt,
                "instruction": instruction or None,
                "limit": args.train_limit if which == "train" else args.eval_limit}

    train = spec("train", args.dataset, args.dataset_config, args.split)
    if args.eval_dataset is not None:
        same = args.eval_dataset == args.dataset
        ev = spec("eval", args.eval_dataset, args.dataset_config if same else None,
                  args.eval_split)
    elif args.dataset is not None and args.eval_split is not None:
        ev = spec("eval", args.dataset, args.dataset_config, args.eval_split)
    elif args.dataset is None or preset is not None:
        ev = spec("eval", None, None, None)
    else:
        ev = None
    return {"train": train, "eval": ev}


def load_data(args: argparse.Namespace) -> dict[str, tuple[list, list[str]] | None]:
    """``{"train": (messages, answers), "eval": ... or None}``; GSM8K golds reduced to the
    number after ``####`` (what the reward and the logs show)."""
    from sparsejax.data.dataset import load_prompt_dataset  # pylint: disable=g-import-not-at-top
    from sparsejax.data.gsm8k import parse_gold_answer  # pylint: disable=g-import-not-at-top
    out = {}
    for which, kw in data_sources(args).items():
        if kw is None:
            out[which] = None
            continue
        ds = load_prompt_dataset(kw.pop("source"), **kw)
        answers = list(ds["answer"])
        if args.task == "gsm8k":
            answers = [parse_gold_answer(a) if "####" in a else a for a in answers]
        out[which] = (list(ds["messages"]), answers)
    return out


def run_identity(args: argparse.Namespace, reward: Any) -> dict[str, Any]:
    """What joins the checkpoints' identity besides the data digest: the model, the
    tokenizer, the system prompt, and the reward where it is not the task's own."""
    info = {"model": args.model, "tokenizer": args.tokenizer or args.model,
            "system_prompt": args.system_prompt, **adapter_run_info(args)}
    from sparsejax.data.presets import get_task  # pylint: disable=g-import-not-at-top
    default = [(get_task(args.task).reward, 1.0)] if args.task else None
    terms = [(name, weight) for name, _, weight in reward.components]
    if terms != default:
        info["reward"] = [f"{n}={w:g}" for n, w in terms]
    return info


def demo_summary(out_dir: str, seconds: float) -> str:
    """Lines that show what the demo did: train reward at the start and the end, the
    evaluations, the shipped model's accuracy, the outputs, the wall time."""
    from sparsejax.trainers.reporting import read_metrics  # pylint: disable=g-import-not-at-top
    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    train = [r["reward_mean"] for r in rows if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("kind") == "eval"]
    k = max(1, min(10, len(train) // 3))
    lines = [f"demo: train reward (mean of {k} steps) {sum(train[:k]) / k:.3f} at the start "
             f"-> {sum(train[-k:]) / k:.3f} at the end ({len(train)} steps)"]
    try:
        with open(os.path.join(DEMO_DIR, "demo.json"), encoding="utf-8") as f:
            base = json.load(f)["test_accuracy"]
        lines.append(f"demo: greedy test accuracy {100 * base:.1f}% (shipped model) -> "
                     + ", ".join(f"{100 * a:.1f}% (step {s})" for s, a in evals))
    except (OSError, KeyError, ValueError):
        pass
    lines.append(f"demo: {out_dir}: metrics.jsonl, curves.png, checkpoints/, final_eval.json, "
                 f"final_model/; {seconds:.0f} s")
    return "\n".join(lines)


def main(argv=None, entry: dict[str, Any] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv, entry)
    try:
        check_args(args)
        sparse = sparse_config(args)
        reward = build_reward(reward_specs(args))
        from sparsejax.trainers.config import GRPOConfig  # pylint: disable=g-import-not-at-top
        config = GRPOConfig(
            steps=args.steps, prompts_per_step=args.prompts_per_step,
            num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            generation_batch_size=args.generation_batch_size,
            micro_batch_size=args.micro_batch_size, loss_type=args.loss_type,
            advantage_scale=args.advantage_scale, epsilon=args.epsilon,
            epsilon_high=args.epsilon_high, beta=args.beta,
            kl_bias_correction=args.kl_bias_correction,
            top_entropy_quantile=args.top_entropy_quantile, eval_every=args.eval_every,
            eval_limit=args.eval_limit, eval_temperature=args.eval_temperature,
            eval_batch_size=args.eval_batch_size,
            eval_max_new_tokens=args.eval_max_new_tokens, save_every=args.save_every,
            seed=args.seed, remat=args.remat, mesh=args.mesh)
        local = args.data_dir is not None or all(
            kw is None or os.path.exists(os.path.expanduser(kw["source"]))
            for kw in data_sources(args).values())
        data = load_data(args) if local else None  # local files: checked before the lock
        if open_out_dir(args):
            return 0
        mesh = run_mesh(args)  # after jax.distributed starts: it sees every device
        if mesh is not None:
            from sparsejax import sharding  # pylint: disable=g-import-not-at-top
            for name in ("micro_batch_size", "prompts_per_step"):
                sharding.check_batch(flag(name), getattr(args, name), mesh)
            sharding.check_batch("--generation-batch-size", min(
                args.generation_batch_size, args.prompts_per_step * args.num_generations), mesh)
        if data is None:
            data = load_data(args)
    except ValueError as e:
        fail(str(e))

    # Heavy imports after argument checks, so --help and bad flags answer at once.
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from sparsejax.data.dataset import render_prompts  # pylint: disable=g-import-not-at-top
    from sparsejax.trainers.grpo import GRPOTrainer  # pylint: disable=g-import-not-at-top
    try:
        graphdef, params, tokenizer = load_model_and_tokenizer(args, mesh)
    except ValueError as e:
        fail(str(e))

    def encode(messages):
        return [tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in render_prompts(messages, tokenizer)]

    try:
        train_ids = encode(data["train"][0])
        test_ids = encode(data["eval"][0]) if data["eval"] is not None else None
    except ValueError as e:
        fail(str(e))
    model_config = nnx.merge(graphdef, params).config
    stop = sorted({tokenizer.eos_token_id, *model_config.eos_token_ids} - {None})
    try:
        updater = build_updater(args, sparse, params, model_name=args.model, mesh=mesh)
        trainer = GRPOTrainer(graphdef, params, tokenizer, reward, config, sparse,
                              args.out_dir, stop_token_ids=stop, updater=updater, mesh=mesh)
    except Exception as e:  # pylint: disable=broad-except  # a mask that does not fit
        if not args.mask_path and not isinstance(e, ValueError):
            raise
        fail(f"--mask-path {args.mask_path!r}: {e}" if args.mask_path else str(e))
    print(f"training {trainer.updater.num_trainable(params):,} of "
          f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters "
          f"({what_trains(args, sparse)}), "
          f"LR {sparse.learning_rate}, {len(train_ids):,} prompts, reward "
          f"{' + '.join(f'{w:g} * {n}' for n, _, w in reward.components)}", file=sys.stderr)
    model_dir = os.path.join(args.out_dir, "final_model")
    final = train_with_writer(
        args, trainer.train, train_ids, data["train"][1], eval_prompt_ids=test_ids,
        eval_answers=data["eval"][1] if data["eval"] else None, resume=args.resume,
        progress=not args.no_progress, final_model_dir=model_dir,
        run_info=run_identity(args, reward))
    print(json.dumps({k: v for k, v in final.items() if k != "eval_samples"}, indent=2))
    print(f"final model: {model_dir}", file=sys.stderr)
    if args.demo and os.path.realpath(args.model) == os.path.realpath(DEMO_DIR):
        print(demo_summary(args.out_dir, time.perf_counter() - t_start), file=sys.stderr)
    return 0


ENTRY = {"doc": __doc__}

if __name__ == "__main__":
    run_main(main)
