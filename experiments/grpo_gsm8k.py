"""GRPO on GSM8K with sparse (default: 1% of the weights) or full finetuning.

Defaults mirror the Multiple Ticket Hypothesis GSM8K run (arXiv 2602.01599):
Qwen2.5-0.5B-Instruct, 32 prompts x 16 samples per step, 100 steps, at most 1024 new
tokens, a per-tensor random mask at 99% sparsity (seed 0), LR 1e-4; advantage =
reward - group mean, no KL; the prompt asks for the answer in \\boxed{}.
``--sparsity 0`` is full finetuning (the paper's LR 1e-6).

    python experiments/grpo_gsm8k.py                                  # hub model + data
    python experiments/grpo_gsm8k.py --model ./Qwen2.5-0.5B-Instruct \\
        --data-dir ../shared/data/gsm8k                                # local files
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (add_model_args, add_run_args, add_sparse_args,  # noqa: E402
                    check_jsonl, check_model_folder, check_number, check_numbers,
                    check_run_args, fail, load_model_and_tokenizer, open_out_dir, run_main,
                    sparse_config)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, "Qwen/Qwen2.5-0.5B-Instruct")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="folder with train.jsonl/test.jsonl (default: openai/gsm8k from the hub)")
    data.add_argument("--train-limit", type=int, default=None, help="use the first N problems")
    data.add_argument("--system-prompt", default=None, help="optional system message")
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
    grpo.add_argument("--kl-bias-correction", action="store_true",
                      help="multiply the per-token KL by the importance ratio (TRL's "
                           "use_bias_correction_kl; off by default, as in TRL)")
    grpo.add_argument("--top-entropy-quantile", type=float, default=1.0,
                      help="policy gradient on this top fraction of entropy tokens (0.2: 80/20)")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-every", type=int, default=25, help="0: only at the end")
    ev.add_argument("--eval-limit", type=int, default=None,
                    help="evaluate on the first N test problems (default: all 1,319)")
    ev.add_argument("--eval-temperature", type=float, default=0.0,
                    help="0: greedy; the paper also reports T=0.9")
    ev.add_argument("--eval-batch-size", type=int, default=64)
    ev.add_argument("--eval-max-new-tokens", type=int, default=None,
                    help="completion budget of evaluation (default: --max-new-tokens)")
    add_sparse_args(parser, default_lr=None)
    add_run_args(parser, "runs/grpo_gsm8k")
    return parser.parse_args(argv)


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
    check_model_folder(args)
    if args.data_dir is not None:
        for split in ("train", "test"):
            path = os.path.join(args.data_dir, f"{split}.jsonl")
            if not os.path.isfile(path):
                raise ValueError(f"cannot load GSM8K: --data-dir {args.data_dir!r} has no "
                                 f"{split}.jsonl")
            check_jsonl(path, required=("question", "answer"))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        sparse = sparse_config(args)
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
            seed=args.seed, remat=args.remat)
        if open_out_dir(args):
            return 0
    except ValueError as e:
        fail(str(e))

    # Heavy imports after argument checks, so --help and bad flags answer at once.
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from sparsejax import rewards  # pylint: disable=g-import-not-at-top
    from sparsejax.data import gsm8k  # pylint: disable=g-import-not-at-top
    from sparsejax.trainers.grpo import GRPOTrainer  # pylint: disable=g-import-not-at-top
    try:
        train = gsm8k.load_gsm8k("train", data_dir=args.data_dir, limit=args.train_limit)
        test = gsm8k.load_gsm8k("test", data_dir=args.data_dir, limit=args.eval_limit)
    except (OSError, ValueError) as e:
        fail(f"cannot load GSM8K: {e}")
    try:
        graphdef, params, tokenizer = load_model_and_tokenizer(args)
    except ValueError as e:
        fail(str(e))

    def encode(questions):
        texts = [gsm8k.format_prompt(q, tokenizer, system_prompt=args.system_prompt)
                 for q in questions]
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    try:
        train_ids, test_ids = encode(train["question"]), encode(test["question"])
    except ValueError as e:
        fail(str(e))
    model_config = nnx.merge(graphdef, params).config
    stop = sorted({tokenizer.eos_token_id, *model_config.eos_token_ids} - {None})

    def reward_fn(completions, answers):
        return [rewards.score_completion(c, a) for c, a in zip(completions, answers)]

    try:
        trainer = GRPOTrainer(graphdef, params, tokenizer, reward_fn, config, sparse,
                              args.out_dir, stop_token_ids=stop)
    except Exception as e:  # pylint: disable=broad-except  # a mask that does not fit
        if not args.mask_path and not isinstance(e, ValueError):
            raise
        fail(f"--mask-path {args.mask_path!r}: {e}" if args.mask_path else str(e))
    print(f"training {trainer.updater.num_trainable(params):,} of "
          f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters "
          f"({'full finetuning' if sparse.dense else f'sparsity {sparse.sparsity}'}), "
          f"LR {sparse.learning_rate}", file=sys.stderr)
    model_dir = os.path.join(args.out_dir, "final_model")
    try:
        final = trainer.train(train_ids, list(train["gold"]), eval_prompt_ids=test_ids,
                              eval_answers=list(test["gold"]), resume=args.resume,
                              progress=not args.no_progress, final_model_dir=model_dir,
                              run_info={"model": args.model,
                                        "tokenizer": args.tokenizer or args.model,
                                        "system_prompt": args.system_prompt})
    except ValueError as e:  # a resume with changed settings, --steps below the checkpoint
        fail(str(e))
    print(json.dumps({k: v for k, v in final.items() if k != "eval_samples"}, indent=2))
    print(f"final model: {model_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
