"""GRPO's data and reward from the command line: the built-in tasks, hub datasets and
local files, the ``--reward`` terms, the run's identity and the ``--demo`` presets.

Nothing here imports jax at import time: the checks read JSON Lines files only, and the
data and rewards load when called.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from typing import Any, NamedTuple

from sparsejax.cli.checks import check_jsonl
from sparsejax.cli.settings import TASK_NAMES  # noqa: F401  (re-exported)

TASK_TITLES = {"gsm8k": "GSM8K", "math": "MATH", "arithmetic": "arithmetic"}  # one per TASK_NAMES
# Where the demo model and task ship (found without importing sparsejax's modules).
DEMO_DIR = os.path.join(importlib.util.find_spec("sparsejax").submodule_search_locations[0],
                        "demo")
DEMO_REWARD = "sparsejax.data.toy_task:reward_fn"
DEMO = {  # what --demo sets, by dest (a --config file or a flag given beside it wins)
    "model": DEMO_DIR, "dataset": os.path.join(DEMO_DIR, "train.jsonl"),
    "eval_dataset": os.path.join(DEMO_DIR, "test.jsonl"), "instruction": "",
    "dtype": "float32", "remat": "none", "steps": 60, "prompts_per_step": 16,
    "num_generations": 8, "max_new_tokens": 5, "generation_batch_size": 128,
    "micro_batch_size": 128, "eval_every": 20, "eval_batch_size": 256, "save_every": 20,
    "lr": 1e-2, "out_dir": "runs/grpo_demo", "reward": [DEMO_REWARD],
}


def demo_presets(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--demo`` presets when ``--demo`` is on (:func:`sparsejax.cli.config_file.parse`)."""
    return DEMO if getattr(args, "demo", False) else None


def check_data_dir(args: argparse.Namespace) -> None:
    """``--data-dir``: the task's train.jsonl and test.jsonl, with the fields it reads."""
    if args.data_dir is None:
        return
    from sparsejax.data.presets import get_task
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
    from sparsejax.data.presets import get_task
    return [get_task(args.task).reward]


def build_reward(specs: list[str]) -> Any:
    """One :class:`~sparsejax.rewards.CombinedReward` of the ``--reward`` values; a user
    function's term is named after the function (its metric: ``reward/<function>``)."""
    from sparsejax import rewards
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
    from sparsejax.data.gsm8k import BOXED_INSTRUCTION
    from sparsejax.data.presets import get_task, split_source
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
            else:  # the hub id, or the cached file of a generated split
                source, config = split_source(base), base.config
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


def data_is_local(args: argparse.Namespace) -> bool:
    """Whether every data source is a local file (then it is read before the run folder
    is locked, so a bad file fails before anything is written)."""
    return args.data_dir is not None or all(
        kw is None or os.path.exists(os.path.expanduser(kw["source"]))
        for kw in data_sources(args).values())


class TaskData(NamedTuple):
    """One split's prompts (chat messages), gold answers and columns for the reward."""

    messages: list
    answers: list[str]
    columns: dict[str, list]


def load_data(args: argparse.Namespace) -> dict[str, TaskData | None]:
    """``{"train": TaskData, "eval": TaskData or None}``; GSM8K golds reduced to the
    number after ``####`` (what the reward and the logs show). ``columns`` are every field
    of the rows as read (the reward's keyword arguments), less those named like the
    reward's own arguments (``completions``, ``answers``, ``prompts``, ``completion_ids``)."""
    from sparsejax.data.dataset import read_prompt_data
    from sparsejax.data.gsm8k import parse_gold_answer
    from sparsejax.rewards.arguments import RESERVED_ARGUMENTS
    out = {}
    for which, kw in data_sources(args).items():
        if kw is None:
            out[which] = None
            continue
        data = read_prompt_data(kw.pop("source"), **kw)
        answers = data.answers
        if args.task == "gsm8k":
            answers = [parse_gold_answer(a) if "####" in a else a for a in answers]
        columns = {k: v for k, v in data.columns.items() if k not in RESERVED_ARGUMENTS}
        out[which] = TaskData(data.messages, answers, columns)
    return out


def check_reward_columns(reward: Any, data: dict[str, TaskData | None]) -> None:
    """A one-line ValueError if a reward term names a column (a parameter without a
    default) that the train or eval data lack."""
    from sparsejax.rewards.arguments import check_reward_arguments
    for which, split in data.items():
        if split is not None:
            try:
                check_reward_arguments(reward, ["prompts", "completion_ids", *split.columns])
            except ValueError as e:
                raise ValueError(f"--reward ({which} data): {e}") from None


def run_identity(args: argparse.Namespace, reward: Any,
                 adapter_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """What joins the checkpoints' identity besides the data digest: the model, the
    tokenizer, the system prompt, the adapter (``adapter_info``) and the reward where it
    is not the task's own."""
    info = {"model": args.model, "tokenizer": args.tokenizer or args.model,
            "system_prompt": args.system_prompt, **(adapter_info or {})}
    from sparsejax.data.presets import get_task
    default = [(get_task(args.task).reward, 1.0)] if args.task else None
    terms = [(name, weight) for name, _, weight in reward.components]
    if terms != default:
        info["reward"] = [f"{n}={w:g}" for n, w in terms]
    return info


def demo_summary(out_dir: str, seconds: float) -> str:
    """Lines that show what the demo did: train reward at the start and the end, the
    evaluations, the shipped model's accuracy, the outputs, the wall time."""
    from sparsejax.runs.reporting import read_metrics
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
                 f"final_model/, config.yaml; {seconds:.0f} s")
    return "\n".join(lines)
