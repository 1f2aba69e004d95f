"""The papers' findings at toy scale on CPU: sparse vs full GRPO on synthetic addition.

Nothing is downloaded. A tiny Qwen2-architecture decoder is trained from scratch
with supervised steps on ``"a+b="`` -> ``"a+b"`` (:mod:`sparsejax.toy_task`) until
it is right part of the time, then finetuned with GRPO (reward 1 iff the answer is
exactly right) in several ways, and the script measures:

  (a) random 99% sparse vs full finetuning: final accuracy difference;
  (b) pairwise Jaccard of the 99% masks vs chance ``p / (2 - p)``; do all of them work;
  (c) where accuracy collapses as sparsity grows (99% .. 99.999%, per-tensor masks,
      plus a global draw of the same budget where per-tensor leaves nothing);
  (d) the full run's update sparsity (bf16, ``|delta| <= 1e-5``) per layer and per
      matrix type, and its mean update rank (Mukherjee et al.);
  (e) masks predicted from the first 10% of the full run (magnitude, momentum,
      variance scores, exact top-k) vs the final update: Jaccard by sparsity
      (BSR-AdamW Table 2), against the random baseline;
  (f) subnetwork finetuning on the full run's diff mask: accuracy and the share of
      parameters equal to the full run's;
  (g) policy gradient on the top-20% entropy tokens vs all tokens (full finetuning).

Outputs in ``--out-dir``: ``results.md`` (tables and one-line verdicts),
``results.json`` (every number, curves included), ``accuracy_vs_step.png`` and
``accuracy_vs_trainable.png``, and the curves through ``--report-to`` (default
``metrics.jsonl``; ``tensorboard``, ``wandb``). The same command gives the same numbers.

    python experiments/toy_rlvr.py              # the default run (~3-5 min, 2 CPU cores)
    python experiments/toy_rlvr.py --quick --out-dir /tmp/toy   # CI smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import os
import platform
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_number, check_out_dir_path, check_report_to_flag, fail  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true",
                        help="tiny CI configuration (< 2 minutes); writes to "
                             "experiments/results/toy_rlvr_quick/ unless --out-dir is given")
    parser.add_argument("--out-dir", default=None,
                        help="results folder (default experiments/results/toy_rlvr/)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data splits, model init, SFT and GRPO sampling")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per run")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiply every learning rate (for a sweep)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--report-to", default="jsonl", metavar="WRITERS",
                        help="where the per-step curves go, comma-separated: jsonl "
                             "(<out-dir>/metrics.jsonl), tensorboard (<out-dir>/tensorboard/), "
                             "wandb, none; tags are <run>/reward_mean, <run>/accuracy, sft/...")
    args = parser.parse_args(argv)
    try:
        check_number(args, "steps", low=1)
        check_number(args, "seed", low=0)
        check_number(args, "lr_scale", low=0.0, low_open=True)
        if args.out_dir is not None:
            check_out_dir_path(args.out_dir)
        check_report_to_flag(args)
    except ValueError as e:
        fail(str(e))
    return args


if __name__ == "__main__":
    parse_args()  # --help and bad flags answer before jax is imported

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sparsejax import analysis  # noqa: E402
from sparsejax import masks as masks_lib  # noqa: E402
from sparsejax import toy_task as tt  # noqa: E402
from sparsejax.models import init_model, save_hf  # noqa: E402
from sparsejax.trainers import GRPOConfig, GRPOTrainer, SparseConfig  # noqa: E402
from sparsejax.trainers.reporting import to_python  # noqa: E402

# Learning rate per sparsity. The Multiple Ticket paper uses 1e-6 for full finetuning
# and 1e-4 at 99% up to 1e-2 at 99.999% (Qwen2.5, GSM8K). We keep the monotone trend:
# full FT lowest (30x below 99%), then x3 per decade of sparsity. Chosen by a short
# 60-step sweep on the default preset: full FT 1e-4 > 3e-4 >> 1e-3 (collapses to ~9%)
# >> 3e-3 (0%); 99%: 3e-3 ~ 1e-2 > 3e-2; 99.9%: 1e-2 ~ 3e-2 > 1e-1.
LEARNING_RATES = {0.0: 1e-4, 0.99: 3e-3, 0.999: 1e-2, 0.9999: 3e-2, 0.99999: 1e-1}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one configuration of the experiment."""

    digits: int
    hidden_size: int
    num_layers: int
    sft: tt.SFTConfig
    sft_dev: int  # held-out problems that decide when SFT stops
    test: int  # held-out problems every reported accuracy is measured on
    train_prompts: int  # GRPO prompt pool
    steps: int
    prompts_per_step: int
    num_generations: int
    eval_points: int  # evaluations along each run (besides step 0 and the end)
    mask_seeds: tuple[int, ...]
    sparsities: tuple[float, ...]
    predict_sparsities: tuple[float, ...]
    works_within: float  # (b): a mask "works" if its accuracy is within this of full FT


DEFAULT = Preset(
    digits=2, hidden_size=64, num_layers=2,
    sft=tt.SFTConfig(max_steps=3000, batch_size=128, learning_rate=3e-3, warmup_steps=100,
                     eval_every=50, band_low=0.3, band_high=0.7),
    sft_dev=256, test=1024, train_prompts=1024, steps=100, prompts_per_step=16,
    num_generations=8, eval_points=9, mask_seeds=(0, 1, 2, 3, 4),
    sparsities=(0.99, 0.999, 0.9999, 0.99999), predict_sparsities=(0.9, 0.99, 0.999),
    works_within=0.05)

QUICK = Preset(
    digits=2, hidden_size=32, num_layers=1,
    sft=tt.SFTConfig(max_steps=150, batch_size=64, learning_rate=1e-2, warmup_steps=20,
                     eval_every=50, band_low=0.3, band_high=0.7),
    sft_dev=64, test=64, train_prompts=64, steps=10, prompts_per_step=4,
    num_generations=4, eval_points=1, mask_seeds=(0, 1), sparsities=(0.99, 0.999),
    predict_sparsities=(0.9, 0.99), works_within=0.05)


# ----------------------------------------------------------------------------- helpers


def host_copy(tree: Any) -> Any:
    """A host (NumPy) copy of a pytree: safe from buffer donation by the trainer."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def device_copy(tree: Any) -> Any:
    """Fresh device arrays for a trainer to own (it donates its params)."""
    return jax.tree.map(jnp.array, tree)


def total_params(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def sparsity_name(s: float) -> str:
    return "full" if s == 0 else f"{100 * s:g}%"


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass
class RunResult:
    """One GRPO run: its settings, its curve and where it ended."""

    name: str
    kind: str  # full | random | diff_mask | entropy
    sparsity: float
    learning_rate: float
    trainable: int
    trainable_fraction: float
    final_accuracy: float
    curve: list[tuple[int, float]]
    train_reward: list[float]
    seconds: float
    mask_seed: int | None = None
    top_entropy_quantile: float = 1.0
    strategy: str = "per_tensor"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Experiment:
    """Holds the task, the SFT base model and the GRPO settings shared by every run."""

    def __init__(self, preset: Preset, seed: int, progress: bool, workdir: str):
        self.p, self.seed, self.progress, self.workdir = preset, seed, progress, workdir
        self.writer = None  # a sparsejax.metric_writers writer (--report-to), or None
        self.tokenizer = tt.build_tokenizer()
        self.sft_dev = tt.make_problems(preset.sft_dev, seed=seed * 1000 + 1,
                                        digits=preset.digits)
        self.test = tt.make_problems(preset.test, seed=seed * 1000 + 2, digits=preset.digits,
                                     exclude=self.sft_dev)
        self.train = tt.make_problems(preset.train_prompts, seed=seed * 1000 + 3,
                                      digits=preset.digits, exclude=self.sft_dev + self.test)
        self.train_ids = tt.encode_prompts(self.tokenizer, self.train)
        self.train_answers = [q.answer for q in self.train]
        self.test_ids = tt.encode_prompts(self.tokenizer, self.test)
        self.test_answers = [q.answer for q in self.test]
        self.model_cfg = tt.model_config(self.tokenizer, hidden_size=preset.hidden_size,
                                         num_layers=preset.num_layers)
        self.graphdef, params = nnx.split(init_model(self.model_cfg, seed=seed))
        self.base = None  # host params after SFT
        self.sft_history: list[dict[str, Any]] = []
        self.sft_seconds = 0.0
        self.base_accuracy = None
        self.total = total_params(params)
        self._init_params = params

    def run_sft(self) -> None:
        """Supervised warm-up into the accuracy band; sets ``self.base``."""
        t0 = time.perf_counter()
        bar = tqdm(total=self.p.sft.max_steps, desc="SFT", disable=not self.progress)

        def report(rec: dict[str, Any]) -> None:
            self.log(rec["step"], {"sft/loss": rec["loss"], "sft/dev_accuracy": rec["accuracy"]})
            bar.update(rec["step"] - bar.n)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", dev_acc=f"{rec['accuracy']:.3f}")

        sft_cfg = dataclasses.replace(self.p.sft, seed=self.seed)
        params, self.sft_history = tt.sft_warmup(self.graphdef, self._init_params,
                                                 self.tokenizer, self.sft_dev, sft_cfg,
                                                 digits=self.p.digits, progress=report)
        bar.close()
        self.base = host_copy(params)
        self.sft_seconds = time.perf_counter() - t0
        self.base_accuracy = self.accuracy(self.base)

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write_scalars(step, scalars)

    @staticmethod
    def tag(name: str) -> str:
        """A run's name as a metric prefix ("random 99% seed 0" -> "random_99pct_seed_0")."""
        return re.sub(r"[^A-Za-z0-9.\-]+", "_", name.replace("%", "pct")).strip("_")

    def accuracy(self, params: Any) -> float:
        return tt.greedy_accuracy(self.graphdef, device_copy(params), self.tokenizer,
                                  self.test, digits=self.p.digits,
                                  batch_size=min(256, len(self.test)))

    def grpo_config(self, top_entropy_quantile: float = 1.0) -> GRPOConfig:
        p = self.p
        per_step = p.prompts_per_step * p.num_generations
        return GRPOConfig(
            steps=p.steps, prompts_per_step=p.prompts_per_step,
            num_generations=p.num_generations, max_new_tokens=tt.max_answer_tokens(p.digits),
            temperature=1.0, generation_batch_size=per_step, micro_batch_size=per_step,
            logprob_chunk_size=4096, eval_batch_size=min(256, len(self.test)),
            top_entropy_quantile=top_entropy_quantile, seed=self.seed)

    def run(self, name: str, kind: str, sparsity: float, lr: float, *, mask_seed: int = 0,
            mask: Any = None, top_entropy_quantile: float = 1.0, strategy: str = "per_tensor",
            snapshot_steps: int = 0) -> tuple[RunResult, Any, list[Any], Any]:
        """One GRPO run from the SFT base.

        Returns ``(result, final host params, snapshots, mask)``; ``snapshots`` holds
        host copies of the params after steps ``0..snapshot_steps`` (step 0 = base).
        """
        t0 = time.perf_counter()
        cfg = self.grpo_config(top_entropy_quantile)
        sparse = SparseConfig(sparsity=sparsity, mask_seed=mask_seed, mask_strategy=strategy,
                              learning_rate=lr, weight_decay=0.0, max_grad_norm=1.0,
                              backend="xla")
        if mask is not None:
            # A given mask takes the sparse path; ``sparsity`` only labels the run.
            sparse = dataclasses.replace(sparse, sparsity=min(max(sparsity, 1e-9), 1 - 1e-9))
        trainer = GRPOTrainer(self.graphdef, device_copy(self.base), self.tokenizer,
                              tt.reward_fn, cfg, sparse, os.path.join(self.workdir, name),
                              mask=mask)
        trainable = trainer.updater.num_trainable(trainer.params)
        snapshots = [host_copy(self.base)] if snapshot_steps else []
        eval_at = set(np.linspace(0, cfg.steps, self.p.eval_points + 2).round().astype(int)
                      .tolist()[1:-1])
        curve = [(0, self.base_accuracy)]
        rewards = []
        bar = tqdm(range(cfg.steps), desc=f"GRPO {name}", disable=not self.progress,
                   leave=False)
        for _ in bar:
            if trainable:
                rec = trainer.train_step(self.train_ids, self.train_answers)
            else:  # nothing to train (e.g. 99.999% of a tiny model): the base model
                rec = {"reward_mean": float("nan")}
                trainer.step += 1
            rewards.append(rec["reward_mean"])
            self.log(trainer.step - 1, {f"{self.tag(name)}/reward_mean": rec["reward_mean"]})
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}")
            if trainer.step <= snapshot_steps:
                snapshots.append(host_copy(trainer.params))
            if trainer.step in eval_at:
                curve.append((trainer.step, self.accuracy(trainer.params)))
        final = host_copy(trainer.params)
        acc = self.accuracy(final)
        curve.append((cfg.steps, acc))
        for step, value in curve:
            self.log(step, {f"{self.tag(name)}/accuracy": value})
        result = RunResult(name=name, kind=kind, sparsity=sparsity, learning_rate=lr,
                           trainable=trainable, trainable_fraction=trainable / self.total,
                           final_accuracy=acc, curve=curve, train_reward=rewards,
                           seconds=time.perf_counter() - t0,
                           mask_seed=mask_seed if kind == "random" else None,
                           top_entropy_quantile=top_entropy_quantile,
                           strategy=strategy if kind == "random" else "-")
        return result, final, snapshots, trainer.updater.mask


# ----------------------------------------------------------------------------- measurements


def update_sparsity_report(exp: Experiment, base: Any, final: Any) -> dict[str, Any]:
    """(d): ``analysis.diff_checkpoints`` on two HF folders written by ``save_hf``."""
    with tempfile.TemporaryDirectory() as tmp:
        a, b = os.path.join(tmp, "base"), os.path.join(tmp, "final")
        save_hf(nnx.merge(exp.graphdef, device_copy(base)), a)
        save_hf(nnx.merge(exp.graphdef, device_copy(final)), b)
        report = analysis.diff_checkpoints(a, b, atol=1e-5, dtype="bfloat16", rank=True)
        report_f32 = analysis.diff_checkpoints(a, b, atol=1e-5, dtype="float32")
    out = report.to_dict()
    out.pop("tensors")
    out["a"], out["b"] = "sft_base", "full_final"
    out["float32_sparsity"] = report_f32.sparsity
    return out


def prediction_report(snapshots: list[Any], base: Any, final: Any, diff: Any,
                      sparsities: tuple[float, ...]) -> dict[str, Any]:
    """(e): early-trajectory scores -> exact top-k masks vs the final update's masks.

    The target at sparsity ``s`` is the top-``k`` of ``|final - base|`` at the same
    ``s`` (BSR-AdamW's Table 2 setting); a second target is the bf16 diff mask
    itself, predicted at its own size.
    """
    scorers = {"magnitude": analysis.MagnitudeScorer(),
               "momentum": analysis.MomentumScorer(beta=0.9),
               "variance": analysis.VarianceScorer(score="snr")}
    scores = {}
    for name, scorer in scorers.items():
        for params in snapshots:
            scorer.update(params)
        scores[name] = scorer.scores()
    total = total_params(base)
    final_delta = jax.tree.map(lambda a, b: np.abs(np.asarray(b, np.float32)
                                                   - np.asarray(a, np.float32)), base, final)
    rows = []
    for s in sparsities:
        target = masks_lib.topk_mask(final_delta, s)
        row = {"sparsity": s, "k": masks_lib.num_active(target)}
        for name, sc in scores.items():
            pred = masks_lib.topk_mask(sc, s)
            row[name] = masks_lib.jaccard(pred, target)
        row["random"] = masks_lib.random_baselines(target, target, total)["jaccard"]
        rows.append(row)
    k_diff = masks_lib.num_active(diff)
    diff_row = {"k": k_diff, "sparsity": 1 - k_diff / total}
    if 0 < k_diff < total:
        for name, sc in scores.items():
            pred = masks_lib.topk_mask(sc, 1 - k_diff / total)
            diff_row[name] = masks_lib.jaccard(pred, diff)
        diff_row["random"] = k_diff / total / (2 - k_diff / total)
    return {"window_checkpoints": len(snapshots), "rows": rows, "vs_diff_mask": diff_row}


def equal_share(a: Any, b: Any, atol: float, dtype: Any) -> float:
    """Share of parameters with ``|a - b| <= atol`` (after rounding to ``dtype``)."""
    changed = masks_lib.num_active(masks_lib.diff_mask(a, b, atol=atol, dtype=dtype))
    return 1.0 - changed / total_params(a)


# ----------------------------------------------------------------------------- reporting


def verdicts(m: dict[str, Any]) -> dict[str, str]:
    """One line per measurement, from the numbers."""
    out = {}
    a = m["a"]
    out["a"] = (f"99% random masks reach {fmt_pct(a['sparse99_mean'])} vs "
                f"{fmt_pct(a['full'])} for full FT (difference "
                f"{100 * a['difference']:+.1f} points; SFT base {fmt_pct(a['base'])}): "
                + ("matches full FT" if abs(a["difference"]) <= a["tolerance"] else
                   "better than full FT" if a["difference"] > 0 else "worse than full FT")
                + f" within {100 * a['tolerance']:.0f} points.")
    b = m["b"]
    out["b"] = (f"mean pairwise Jaccard {b['mean_jaccard']:.4f} vs chance "
                f"{b['chance_jaccard']:.4f}; {b['num_working']}/{b['num_masks']} masks "
                f"within {100 * b['tolerance']:.0f} points of full FT"
                + (" -- many disjoint-ish tickets all work." if b["all_work"] else "."))
    c = m["c"]
    out["c"] = ("accuracy gain over SFT retained: " + ", ".join(
        r["label"] + " " + fmt_pct(r["gain_retained"], 0) for r in c["rows"]) + "; "
        + (f"collapse (< 50% of full FT's gain) from {c['collapse_at']}"
           if c["collapse_at"] else "no collapse in the range") + ".")
    d = m["d"]
    out["d"] = (f"full FT left {fmt_pct(d['total']['sparsity'])} of parameters unchanged "
                f"in bf16 at 1e-5 (float32: {fmt_pct(d['float32_sparsity'])}); mean update "
                f"rank {fmt_pct(d['total']['mean_rank_fraction'])} of full rank.")
    e = m["e"]
    best = {name: np.mean([r[name] for r in e["rows"]]) for name in
            ("magnitude", "momentum", "variance")}
    winner = max(best, key=best.get)
    chance = float(np.mean([r["random"] for r in e["rows"]]))
    ratio = best[winner] / chance if chance > 0 else float("inf")
    out["e"] = (f"best predictor {winner}: mean Jaccard {best[winner]:.3f} with the final "
                f"top-k vs {chance:.4f} for a random mask ({ratio:.1f}x chance) -- "
                + ("the early window carries real signal about where the update lands, but "
                   "most of the final top-k is not predicted." if ratio >= 2 and
                   best[winner] < 0.5 else
                   "the early window predicts the final top-k well." if ratio >= 2 else
                   "no better than twice chance."))
    f = m["f"]
    out["f"] = (f"subnetwork FT on the diff mask ({fmt_pct(f['trainable_fraction'], 2)} "
                f"trainable) reaches {fmt_pct(f['accuracy'])} vs full {fmt_pct(f['full'])}; "
                f"{fmt_pct(f['equal_bf16_1e-5'])} of parameters equal to full FT's at 1e-5 "
                f"(bf16), {fmt_pct(f['equal_bf16_1e-4'])} at 1e-4.")
    g = m["g"]
    out["g"] = (f"top-20% entropy tokens: {fmt_pct(g['top20'])} vs all tokens "
                f"{fmt_pct(g['all'])} ({100 * (g['top20'] - g['all']):+.1f} points).")
    return out


def write_markdown(path: str, res: dict[str, Any]) -> None:
    m, v = res["measurements"], res["verdicts"]
    lines = [
        "# Toy RLVR: sparse vs full GRPO on synthetic addition (CPU)", "",
        f"Command: `{res['command']}`  ",
        f"Task: {res['config']['digits']}-digit addition; model: Qwen2-style, hidden "
        f"{res['config']['hidden_size']}, {res['config']['num_layers']} layers, "
        f"{res['total_params']:,} parameters; SFT stopped at step "
        f"{res['sft']['steps']} with test accuracy {fmt_pct(res['sft']['test_accuracy'])}; "
        f"GRPO {res['config']['steps']} steps x {res['config']['prompts_per_step']} prompts "
        f"x {res['config']['num_generations']} samples; accuracy = greedy exact match on "
        f"{res['config']['test']} held-out problems.  ",
        f"Wall time: {res['seconds']:.0f} s ({res['device']}).", "",
        "## Runs", "",
        "| run | trainable params | trainable % | LR | final accuracy |",
        "|---|---:|---:|---:|---:|",
        f"| SFT base (no RL) | 0 | 0 | - | {fmt_pct(res['sft']['test_accuracy'])} |",
    ]
    for r in res["runs"]:
        lines.append(f"| {r['name']} | {r['trainable']:,} | {100 * r['trainable_fraction']:.4g} "
                     f"| {r['learning_rate']:g} | {fmt_pct(r['final_accuracy'])} |")
    a, b, c, d, e, f, g = (m[k] for k in "abcdefg")
    lines += ["", "## (a) 99% random sparse vs full finetuning", "",
              f"Full FT {fmt_pct(a['full'])}; 99% random (mean of {len(a['sparse99'])} masks) "
              f"{fmt_pct(a['sparse99_mean'])}; difference {100 * a['difference']:+.1f} points.",
              "", f"**Verdict:** {v['a']}", "",
              "## (b) Multiple tickets: mask overlap", "",
              "| pair | Jaccard | chance p/(2-p) |", "|---|---:|---:|"]
    for pair in b["pairs"]:
        lines.append(f"| seeds {pair['seeds'][0]}-{pair['seeds'][1]} | {pair['jaccard']:.5f} "
                     f"| {b['chance_jaccard']:.5f} |")
    lines += ["", "| mask seed | accuracy | within tolerance of full |", "|---|---:|---|"]
    for w in b["per_mask"]:
        works = "yes" if w["works"] else "no"
        lines.append(f"| {w['seed']} | {fmt_pct(w['accuracy'])} | {works} |")
    lines += ["", f"**Verdict:** {v['b']}", "",
              "## (c) Accuracy vs sparsity", "",
              "| sparsity | trainable | LR | accuracy | gain over SFT retained |",
              "|---|---:|---:|---:|---:|"]
    for r in c["rows"]:
        kept = "n/a" if r["gain_retained"] is None else f"{100 * r['gain_retained']:.0f}%"
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['learning_rate']:g} | "
                     f"{fmt_pct(r['accuracy'])} | {kept} |")
    lines += ["", f"**Verdict:** {v['c']}", "",
              "## (d) Update sparsity of the full run (bf16, |delta| <= 1e-5)", "",
              f"Total: {d['total']['changed']:,} of {d['total']['params']:,} changed, update "
              f"sparsity {fmt_pct(d['total']['sparsity'], 2)}; mean update rank "
              f"{fmt_pct(d['total']['mean_rank_fraction'])} of full rank.", "",
              ]
    for heading, groups in (("layer", d["by_layer"]), ("matrix", d["by_type"])):
        lines += [f"| {heading} | params | update sparsity | mean rank |", "|---|---:|---:|---:|"]
        lines += [f"| {g_['name']} | {g_['params']:,} | {fmt_pct(g_['sparsity'], 2)} | "
                  f"{fmt_pct(g_['mean_rank_fraction'])} |" for g_ in groups]
        lines.append("")
    lines += [f"**Verdict:** {v['d']}", "",
              "## (e) Predicting the update from the first 10% of the full run", "",
              f"Scores over {e['window_checkpoints']} checkpoints "
              f"(steps 0..{e['window_checkpoints'] - 1}); "
              "target = exact top-k of |final - base| at the same sparsity.", "",
              "| sparsity | k | magnitude | momentum | variance (SNR) | random |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in e["rows"]:
        lines.append(f"| {100 * r['sparsity']:g}% | {r['k']:,} | {r['magnitude']:.3f} | "
                     f"{r['momentum']:.3f} | {r['variance']:.3f} | {r['random']:.4f} |")
    dm = e["vs_diff_mask"]
    if "magnitude" in dm:
        lines.append(f"| diff mask ({fmt_pct(1 - dm['sparsity'], 2)} dense) | {dm['k']:,} | "
                     f"{dm['magnitude']:.3f} | {dm['momentum']:.3f} | {dm['variance']:.3f} | "
                     f"{dm['random']:.4f} |")
    lines += ["", f"**Verdict:** {v['e']}", "",
              "## (f) Subnetwork finetuning on the full run's diff mask", "",
              f"Trainable {f['trainable']:,} ({fmt_pct(f['trainable_fraction'], 2)}), LR "
              f"{f['learning_rate']:g}: accuracy {fmt_pct(f['accuracy'])} (full "
              f"{fmt_pct(f['full'])}). Parameters equal to the full run's: "
              f"{fmt_pct(f['equal_bf16_1e-5'])} (bf16, 1e-5), {fmt_pct(f['equal_bf16_1e-4'])} "
              f"(bf16, 1e-4), {fmt_pct(f['equal_f32_1e-5'])} (float32, 1e-5), "
              f"{fmt_pct(f['equal_f32_1e-4'])} (float32, 1e-4).", "",
              f"**Verdict:** {v['f']}", "",
              "## (g) Policy gradient on the top-20% entropy tokens (full FT)", "",
              f"All tokens {fmt_pct(g['all'])}; top-20% entropy tokens {fmt_pct(g['top20'])}.",
              "", f"**Verdict:** {v['g']}", "",
              "Plots: `accuracy_vs_step.png`, `accuracy_vs_trainable.png`.", ""]
    from sparsejax import run_dir  # pylint: disable=g-import-not-at-top
    run_dir.atomic_write_text(path, "\n".join(lines))


def plot(out_dir: str, res: dict[str, Any]) -> list[str]:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    paths = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.get_cmap("tab20").colors
    dashes = {"full": "-", "random": "--", "diff_mask": "-.", "entropy": ":"}
    for i, r in enumerate(res["runs"]):
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", ls=dashes.get(r["kind"], "-"), ms=3,
                color=colors[i % len(colors)], label=f"{r['name']} (lr {r['learning_rate']:g})")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out greedy accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Toy RLVR: accuracy vs step")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy_vs_step.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    positive = [r["trainable_fraction"] for r in res["runs"] if r["trainable_fraction"] > 0]
    floor = min(positive) / 10 if positive else 1e-6
    styles = {"full": "s", "random": "o", "diff_mask": "D", "entropy": "^"}
    for kind, marker in styles.items():
        rs = [r for r in res["runs"] if r["kind"] == kind]
        if rs:
            ax.scatter([max(r["trainable_fraction"], floor) for r in rs],
                       [r["final_accuracy"] for r in rs], marker=marker, label=kind)
    ax.axhline(res["sft"]["test_accuracy"], color="gray", ls="--", label="SFT base")
    ax.set_xscale("log")
    ax.set_xlabel(f"trainable fraction (log; 0 plotted at {floor:.1e})")
    ax.set_ylabel("final accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Final accuracy vs trainable fraction")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "accuracy_vs_trainable.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    if args.steps is not None:
        preset = dataclasses.replace(preset, steps=args.steps)
    here = os.path.dirname(os.path.abspath(__file__))
    out_dir = args.out_dir or os.path.join(
        here, "results", "toy_rlvr_quick" if args.quick else "toy_rlvr")
    os.makedirs(out_dir, exist_ok=True)
    # One run per folder at a time; Ctrl-C / SIGTERM stop it with one line. The run keeps
    # no checkpoints (it is a few minutes and deterministic: rerun it), and its result
    # files are each written whole, so a stop leaves the previous results or the new ones.
    from sparsejax import run_dir  # pylint: disable=g-import-not-at-top
    from sparsejax.trainers import signals  # pylint: disable=g-import-not-at-top
    signals.install()
    run_dir.lock(out_dir)
    progress = not args.no_progress
    lrs = {k: v * args.lr_scale for k, v in LEARNING_RATES.items()}
    t_start = time.perf_counter()

    from sparsejax.metric_writers import create_writer  # pylint: disable=g-import-not-at-top
    stale = os.path.join(out_dir, "metrics.jsonl")  # the writer appends: start afresh
    if os.path.exists(stale):
        os.remove(stale)
    with tempfile.TemporaryDirectory() as workdir, create_writer(
            args.report_to, out_dir, run_name=os.path.basename(out_dir),
            config={k: v for k, v in vars(args).items()}) as writer:
        exp = Experiment(preset, args.seed, progress, workdir)
        exp.writer = writer
        exp.run_sft()
        runs: dict[str, RunResult] = {}
        plan = (1 + len(preset.mask_seeds) + len(preset.sparsities) - 1 + 2)
        outer = tqdm(total=plan, desc="runs", disable=not progress)

        def done(r: RunResult) -> None:
            runs[r.name] = r
            outer.update(1)
            outer.write(f"{r.name}: trainable {r.trainable:,}, lr {r.learning_rate:g}, "
                        f"accuracy {100 * r.final_accuracy:.1f}% ({r.seconds:.0f} s)")

        # Full finetuning, with the first 10% of its trajectory kept for (e).
        window = max(2, int(round(0.1 * preset.steps)))
        full, full_final, snapshots, _ = exp.run("full", "full", 0.0, lrs[0.0],
                                                 snapshot_steps=window)
        done(full)
        # Random per-tensor masks: several seeds at 99%, one at each higher sparsity.
        masks99 = {}
        for s in preset.sparsities:
            seeds = preset.mask_seeds if s == 0.99 else preset.mask_seeds[:1]
            for seed in seeds:
                name = f"random {sparsity_name(s)}" + (f" seed {seed}" if s == 0.99 else "")
                r, _, _, mask = exp.run(name, "random", s, lrs[s], mask_seed=seed)
                done(r)
                if s == 0.99:
                    masks99[seed] = mask
            if r.trainable == 0:
                # Per-tensor floor(p * numel) leaves a tiny model nothing to train: also
                # draw the same budget over the whole model (round(p * N) entries).
                outer.total += 1
                outer.refresh()
                r, _, _, _ = exp.run(f"random {sparsity_name(s)} global", "random", s,
                                     lrs[s], mask_seed=preset.mask_seeds[0],
                                     strategy="global")
                done(r)
        # (f) the full run's diff mask as the subnetwork.
        diff = masks_lib.diff_mask(exp.base, full_final, atol=1e-5, dtype=jnp.bfloat16)
        k_diff = masks_lib.num_active(diff)
        sub, sub_final, _, _ = exp.run("diff-mask subnetwork", "diff_mask",
                                       1 - k_diff / exp.total, lrs[0.0], mask=diff)
        done(sub)
        # (g) top-20% entropy tokens.
        ent, _, _, _ = exp.run("full, top-20% entropy tokens", "entropy", 0.0, lrs[0.0],
                               top_entropy_quantile=0.2)
        done(ent)
        outer.close()

        # ---- measurements
        base_acc = exp.base_accuracy
        s99 = [runs[f"random 99% seed {s}"] for s in preset.mask_seeds]
        sparse99_mean = float(np.mean([r.final_accuracy for r in s99]))
        m: dict[str, Any] = {}
        m["a"] = {"full": full.final_accuracy, "base": base_acc,
                  "sparse99": [r.final_accuracy for r in s99], "sparse99_mean": sparse99_mean,
                  "difference": sparse99_mean - full.final_accuracy,
                  "tolerance": preset.works_within}
        pairs = []
        for s1, s2 in itertools.combinations(preset.mask_seeds, 2):
            pairs.append({"seeds": [s1, s2],
                          "jaccard": masks_lib.jaccard(masks99[s1], masks99[s2])})
        p99 = masks_lib.num_active(masks99[preset.mask_seeds[0]]) / exp.total
        per_mask = [{"seed": r.mask_seed, "accuracy": r.final_accuracy,
                     "works": r.final_accuracy >= full.final_accuracy - preset.works_within}
                    for r in s99]
        m["b"] = {"pairs": pairs, "mean_jaccard": float(np.mean([q["jaccard"] for q in pairs])),
                  "density": p99, "chance_jaccard": p99 / (2 - p99), "per_mask": per_mask,
                  "num_masks": len(per_mask), "num_working": sum(w["works"] for w in per_mask),
                  "all_work": all(w["works"] for w in per_mask),
                  "tolerance": preset.works_within}
        gain_full = full.final_accuracy - base_acc
        rows, collapse = [], None
        for s in (0.0,) + preset.sparsities:
            if s == 0.0:
                cands = [(full, "full FT")]
            elif s == 0.99:
                cands = [(None, "99% per-tensor (mean of seeds)")]
            else:
                cands = [(runs[f"random {sparsity_name(s)}"], f"{sparsity_name(s)} per-tensor")]
                if f"random {sparsity_name(s)} global" in runs:
                    cands.append((runs[f"random {sparsity_name(s)} global"],
                                  f"{sparsity_name(s)} global"))
            for r, label in cands:
                acc = sparse99_mean if r is None else r.final_accuracy
                trainable = s99[0].trainable if r is None else r.trainable
                kept = (acc - base_acc) / gain_full if gain_full > 1e-9 else None
                rows.append({"sparsity": s, "label": label, "trainable": trainable,
                             "learning_rate": lrs[s], "accuracy": acc, "gain_retained": kept})
                if s > 0 and collapse is None and kept is not None and kept < 0.5:
                    collapse = label
        m["c"] = {"rows": rows, "collapse_at": collapse, "full_gain": gain_full}
        m["d"] = update_sparsity_report(exp, exp.base, full_final)
        m["e"] = prediction_report(snapshots, exp.base, full_final, diff,
                                   preset.predict_sparsities)
        m["f"] = {"trainable": sub.trainable, "trainable_fraction": sub.trainable_fraction,
                  "learning_rate": sub.learning_rate, "accuracy": sub.final_accuracy,
                  "full": full.final_accuracy,
                  "equal_bf16_1e-5": equal_share(sub_final, full_final, 1e-5, jnp.bfloat16),
                  "equal_bf16_1e-4": equal_share(sub_final, full_final, 1e-4, jnp.bfloat16),
                  "equal_f32_1e-5": equal_share(sub_final, full_final, 1e-5, None),
                  "equal_f32_1e-4": equal_share(sub_final, full_final, 1e-4, None)}
        m["g"] = {"all": full.final_accuracy, "top20": ent.final_accuracy,
                  "learning_rate": ent.learning_rate}

    command = "python experiments/toy_rlvr.py" + (" " + " ".join(sys.argv[1:])
                                                  if argv is None and sys.argv[1:] else "")
    res = {
        "command": command if argv is None else "toy_rlvr.main(" + repr(argv) + ")",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores)",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "config": {**{k: v for k, v in dataclasses.asdict(preset).items() if k != "sft"},
                   "sft": dataclasses.asdict(preset.sft), "seed": args.seed,
                   "learning_rates": {sparsity_name(k): v for k, v in lrs.items()}},
        "total_params": exp.total,
        "sft": {"history": exp.sft_history, "steps": exp.sft_history[-1]["step"],
                "dev_accuracy": exp.sft_history[-1]["accuracy"], "test_accuracy": base_acc,
                "seconds": exp.sft_seconds},
        "runs": [r.to_dict() for r in runs.values()],
        "measurements": m,
    }
    res["verdicts"] = verdicts(m)
    res["seconds"] = time.perf_counter() - t_start
    res = to_python(res)
    run_dir.write_json_atomic(os.path.join(out_dir, "results.json"), res)
    write_markdown(os.path.join(out_dir, "results.md"), res)
    plot(out_dir, res)
    if progress:
        print(open(os.path.join(out_dir, "results.md"), encoding="utf-8").read())
    print(f"wrote {out_dir} in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as stop:  # also sparsejax.trainers.signals.Interrupted
        print("interrupted (this run keeps no checkpoints: rerun the command)",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(getattr(stop, "exit_code", 130))
    except Exception as e:  # pylint: disable=broad-except
        run_dir_mod = sys.modules.get("sparsejax.run_dir")
        if run_dir_mod is None or not isinstance(e, run_dir_mod.RunError):
            raise
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
