"""Regenerates the demo model and task that ship in ``sparsejax/demo/`` (``grpo.py --demo``).

The demo is the toy addition task of :mod:`sparsejax.data.toy_task` (``"12+34="`` -> ``"46"``,
2-digit operands): a tiny Qwen2-architecture decoder (hidden 64, 2 layers, ~75k parameters,
float32) trained from scratch with supervised steps until its greedy accuracy on held-out
problems is between 30% and 70%, so GRPO has room to raise it. Written to ``--out``:

* ``config.json``, ``model.safetensors``: the SFT model in Hugging Face format;
* ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``: the character
  tokenizer, with a chat template that renders ``<bos>`` + the user turn, so the generic
  prompt pipeline of ``grpo.py`` gives exactly the toy task's prompt tokens;
* ``train.jsonl``, ``test.jsonl``: ``{"prompt": "12+34=", "answer": "46"}`` records, disjoint
  from each other and from the SFT stopping set;
* ``demo.json``: how it was made (seed, sizes, SFT steps, the SFT model's greedy test
  accuracy, versions, date).

The same command gives the same files (seeded data, init and SFT; XLA CPU is deterministic).

    python experiments/make_demo_model.py                       # rewrites sparsejax/demo/
    python experiments/make_demo_model.py --out /tmp/demo
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

from sparsejax.cli.checks import check_number, check_out_dir_path
from sparsejax.cli.exits import fail

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(os.path.dirname(HERE), "sparsejax", "demo")
# Renders the conversation as the toy prompt: <bos>, then the user turns' text (no
# role markers: the character vocabulary has only digits, "+" and "=").
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ message['content'] }}{% endif %}{% endfor %}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, init and SFT")
    parser.add_argument("--digits", type=int, default=2, help="operand digits")
    parser.add_argument("--train", type=int, default=512, help="GRPO training problems")
    parser.add_argument("--test", type=int, default=256, help="held-out evaluation problems")
    parser.add_argument("--dev", type=int, default=256,
                        help="held-out problems that decide when SFT stops")
    args = parser.parse_args(argv)
    try:
        for name in ("digits", "train", "test", "dev"):
            check_number(args, name, low=1)
        check_number(args, "seed", low=0)
        check_out_dir_path(args.out, "--out")
    except ValueError as e:
        fail(str(e))
    return args


def write_jsonl(path: str, problems) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax
    from flax import nnx

    from sparsejax.data import toy_task as tt
    from sparsejax.models import init_model, save_hf
    from sparsejax.runs import run_dir

    t0 = time.perf_counter()
    tok = tt.build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    dev = tt.make_problems(args.dev, seed=args.seed * 1000 + 1, digits=args.digits)
    test = tt.make_problems(args.test, seed=args.seed * 1000 + 2, digits=args.digits,
                            exclude=dev)
    train = tt.make_problems(args.train, seed=args.seed * 1000 + 3, digits=args.digits,
                             exclude=dev + test)
    cfg = tt.model_config(tok, hidden_size=64, num_layers=2)
    graphdef, params = nnx.split(init_model(cfg, seed=args.seed))
    sft = tt.SFTConfig(max_steps=3000, batch_size=128, learning_rate=3e-3, warmup_steps=100,
                       eval_every=50, band_low=0.3, band_high=0.7, seed=args.seed)
    params, history = tt.sft_warmup(
        graphdef, params, tok, dev, sft, digits=args.digits,
        progress=lambda r: print(f"SFT step {r['step']}: loss {r['loss']:.3f}, "
                                 f"dev accuracy {r['accuracy']:.3f}", file=sys.stderr))
    test_acc = tt.greedy_accuracy(graphdef, params, tok, test, digits=args.digits)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    info = {
        "task": f"{args.digits}-digit addition (sparsejax.data.toy_task)",
        "command": "python experiments/make_demo_model.py"
                   + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "seed": args.seed, "digits": args.digits,
        "train_problems": len(train), "test_problems": len(test), "dev_problems": len(dev),
        "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
        "sft": {**{k: v for k, v in vars(sft).items()}, "steps": history[-1]["step"],
                "dev_accuracy": history[-1]["accuracy"]},
        "test_accuracy": test_acc,
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    with run_dir.atomic_folder(args.out) as folder:
        save_hf(nnx.merge(graphdef, params), folder, tokenizer=tok, dtype="float32")
        # The class name transformers 4.x and 5.x both know for a tokenizer.json tokenizer.
        tc_path = os.path.join(folder, "tokenizer_config.json")
        with open(tc_path, encoding="utf-8") as f:
            tc = json.load(f)
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(tc_path, "w", encoding="utf-8") as f:
            json.dump(tc, f, indent=2)
            f.write("\n")
        for name in os.listdir(folder):
            os.chmod(os.path.join(folder, name), 0o644)
        write_jsonl(os.path.join(folder, "train.jsonl"), train)
        write_jsonl(os.path.join(folder, "test.jsonl"), test)
        with open(os.path.join(folder, "demo.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
    print(f"wrote {args.out}: SFT {history[-1]['step']} steps, greedy test accuracy "
          f"{100 * test_acc:.1f}% ({info['seconds']:.0f} s)", file=sys.stderr)
    return info


if __name__ == "__main__":
    main()
