"""Derive Partial-LoRA per-layer ratios for a model: ``python -m sparsejax.lora``.

Writes the ``--lora-ratios FILE`` that ``experiments/grpo.py``, ``grpo_gsm8k.py`` and
``dpo.py`` take with ``--adapter partial-lora|targeted-lora``
(:func:`sparsejax.lora.save_ratios`; :func:`sparsejax.lora.load_ratios` reads it).

The model is an HF safetensors folder (:func:`sparsejax.models.load_hf`) with its
tokenizer; the few-shot set is a JSON Lines / JSON / Parquet file of prompts and gold
answers (:func:`sparsejax.data.dataset.load_prompt_dataset`), rendered with the
tokenizer's chat template (the plain prompt text when it has none). The metric is the
mean ``--reward`` (:mod:`sparsejax.rewards`) of greedy completions, the few-shot
accuracy for a 0/1 reward. Each adapted kernel is masked progressively by importance
(``--importance``) until the metric falls below ``--threshold`` x the unmasked value;
the last sparsity that held is that kernel's ratio (:func:`sparsejax.lora.derive_ratios`).

    python -m sparsejax.lora sparsejax/demo sparsejax/demo/test.jsonl --limit 64 \\
        --reward sparsejax.data.toy_task:reward_fn --max-new-tokens 5 -o ratios.json
    python experiments/grpo.py --demo --adapter partial-lora --lora-ratios ratios.json

Exit status: 0 done, 2 bad input (one line naming the flag or file).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sparsejax.lora.adapters import DEFAULT_TARGETS
from sparsejax.lora.importance import COMBINE, IMPORTANCE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparsejax.lora", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("model", help="HF model folder (config.json, *.safetensors, tokenizer)")
    parser.add_argument("fewshot", help="few-shot prompts with gold answers (.jsonl/.json/"
                                        ".parquet)")
    parser.add_argument("-o", "--output", required=True, help="ratios JSON to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: model)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="param dtype the model is loaded and evaluated in")
    data = parser.add_argument_group("few-shot set and metric")
    data.add_argument("--prompt-field", default="prompt", help="question column")
    data.add_argument("--answer-field", default="answer", help="gold answer column")
    data.add_argument("--messages-field", default=None,
                      help="chat column to use as the prompt instead of --prompt-field")
    data.add_argument("--instruction", default=None,
                      help="text appended to each question (as the trainers' --instruction)")
    data.add_argument("--system-prompt", default=None, help="optional system message")
    data.add_argument("--limit", type=int, default=None, help="use the first N examples")
    data.add_argument("--reward", default="exact", metavar="SPEC",
                      help="reward of a completion: gsm8k, math, exact, format, "
                           "module:function or path.py:function (comma-separated terms "
                           "NAME[=WEIGHT] are summed); default exact")
    data.add_argument("--max-new-tokens", type=int, default=256,
                      help="greedy completion budget")
    data.add_argument("--batch-size", type=int, default=64, help="prompts per generate call")
    der = parser.add_argument_group("derivation")
    der.add_argument("--threshold", type=float, default=0.9,
                     help="a kernel's sparsity holds while metric >= threshold x baseline")
    der.add_argument("--step", type=float, default=0.1, help="sparsity grid step")
    der.add_argument("--max-sparsity", type=float, default=0.95,
                     help="largest sparsity tried")
    der.add_argument("--importance", default="leverage", choices=IMPORTANCE,
                     help="entry importance: SVD leverage scores or |W|")
    der.add_argument("--svd-rank", type=int, default=8, help="rank k of the truncated SVD")
    der.add_argument("--combine", default="product", choices=COMBINE,
                     help="entry score from row and column leverage")
    der.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                     help="adapted projections, as the trainers' --lora-targets")
    der.add_argument("--model-name", default=None,
                     help="name stored in the file; a trainer given another --model "
                          "refuses it (default: none stored, kernel shapes still checked)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One-line ValueError naming the flag or file for bad input (nothing loaded yet)."""
    if not os.path.isdir(args.model):
        raise ValueError(f"model {args.model!r} is not a folder")
    if not os.path.isfile(args.fewshot):
        raise ValueError(f"few-shot file {args.fewshot!r} does not exist")
    if not 0.0 < args.threshold <= 1.0:
        raise ValueError(f"--threshold must be in (0, 1], got {args.threshold:g}")
    if not 0.0 < args.step < 1.0:
        raise ValueError(f"--step must be in (0, 1), got {args.step:g}")
    if not 0.0 < args.max_sparsity < 1.0:
        raise ValueError(f"--max-sparsity must be in (0, 1), got {args.max_sparsity:g}")
    if args.step > args.max_sparsity:
        raise ValueError(f"--step {args.step:g} is above --max-sparsity "
                         f"{args.max_sparsity:g}: no sparsity to try")
    for flag in ("svd_rank", "max_new_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, flag)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    out_parent = os.path.dirname(os.path.abspath(args.output))
    if os.path.isdir(args.output):
        raise ValueError(f"--output {args.output!r} is a folder")
    probe = out_parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise ValueError(f"--output {args.output!r}: {probe} is not a writable folder")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_fewshot(args: argparse.Namespace, tokenizer: Any) -> tuple[list[list[int]], list[str]]:
    """``(prompt token ids, gold answers)`` of the few-shot file."""
    from sparsejax.data.dataset import load_prompt_dataset
    ds = load_prompt_dataset(args.fewshot, prompt_field=args.prompt_field,
                             answer_field=args.answer_field,
                             messages_field=args.messages_field,
                             system_prompt=args.system_prompt, instruction=args.instruction,
                             limit=args.limit)
    messages, answers = list(ds["messages"]), list(ds["answer"])
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                 for m in messages]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    else:  # no template: the turns' text as one plain prompt
        ids = [tokenizer("\n".join(t["content"] for t in m))["input_ids"] for m in messages]
    return ids, answers


def greedy_reward_metric(graphdef: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                         answers: Sequence[str], reward: Callable[..., list[float]], *,
                         max_new_tokens: int, batch_size: int,
                         stop_token_ids: Sequence[int]) -> Callable[[Any], float]:
    """``metric(params)``: the mean reward of greedy completions of ``prompt_ids``.

    Every call generates with the same padded shapes (one compile): prompts are left
    padded to the longest one and the last batch is filled with copies of its last
    prompt, whose completions are not scored."""
    import jax
    import numpy as np

    from sparsejax.generation.sampler import SamplingParams, decode_completions, generate, left_pad, pad_token_id
    pad = pad_token_id(tokenizer)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                              stop_token_ids=tuple(int(t) for t in stop_token_ids))
    width = max(len(p) for p in prompt_ids)
    batch = min(batch_size, len(prompt_ids))
    chunks = []
    for start in range(0, len(prompt_ids), batch):
        chunk = list(prompt_ids[start:start + batch])
        real = len(chunk)
        tokens, mask = left_pad(chunk + [chunk[-1]] * (batch - real), pad, width)
        chunks.append((tokens, mask, real, list(answers[start:start + real])))

    def metric(params: Any) -> float:
        total = 0.0
        for tokens, mask, real, golds in chunks:
            out = generate(graphdef, params, tokens, mask, jax.random.key(0), sampling,
                           pad_id=pad)
            texts = decode_completions(tokenizer, out)[:real]
            total += float(np.nansum(reward(texts, golds)))
        return total / len(prompt_ids)
    return metric


def run(args: argparse.Namespace) -> str:
    """Loads, derives and writes; returns the output path (ValueError: bad input)."""
    from flax import nnx
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from sparsejax.lora.adapters import select_targets
    from sparsejax.lora.ratios import derive_ratios, save_ratios
    from sparsejax.models import load_hf
    from sparsejax.rewards import reward_from_specs

    try:
        reward = reward_from_specs(args.reward)
    except (ValueError, ImportError) as e:
        raise ValueError(f"--reward {args.reward!r}: {_first_line(e)}") from None
    try:
        model = load_hf(args.model, param_dtype=args.dtype)
    except Exception as e:  # any unusable model: one line
        raise ValueError(f"cannot load model {args.model!r}: {_first_line(e)}") from None
    name = args.tokenizer or args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer {name!r}: {_first_line(e)}") from None
    try:
        prompt_ids, answers = load_fewshot(args, tokenizer)
    except ValueError as e:
        raise ValueError(f"few-shot file {args.fewshot}: {_first_line(e)}") from None
    stop = sorted({tokenizer.eos_token_id, *model.config.eos_token_ids} - {None})
    graphdef, params = nnx.split(model)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    paths = select_targets(params, targets)
    metric = greedy_reward_metric(graphdef, tokenizer, prompt_ids, answers, reward,
                                  max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, stop_token_ids=stop)
    bar = tqdm(total=len(paths), desc="kernels", unit="kernel", disable=args.no_progress)

    def progress(line: str) -> None:
        bar.update(1)
        bar.set_postfix_str(line.split(": ", 1)[-1])

    try:
        ratios = derive_ratios(params, metric, paths, importance=args.importance,
                               svd_rank=args.svd_rank, combine=args.combine,
                               threshold=args.threshold, step=args.step,
                               max_sparsity=args.max_sparsity, model=args.model_name,
                               progress=progress)
    finally:
        bar.close()
    ratios.settings.update(targets=list(targets), reward=args.reward,
                           fewshot=os.path.abspath(args.fewshot), fewshot_size=len(answers),
                           max_new_tokens=args.max_new_tokens,
                           model_path=os.path.abspath(args.model))
    path = save_ratios(args.output, ratios)
    values = list(ratios.ratios.values())
    print(f"baseline metric {ratios.baseline:.4g} on {len(answers)} examples; ratios of "
          f"{len(values)} kernels: mean {sum(values) / len(values):.3g}, min {min(values):g}, "
          f"max {max(values):g}", file=sys.stderr)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        path = run(args)
    except ValueError as e:
        print(f"error: {_first_line(e)}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
