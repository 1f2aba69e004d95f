"""Reporting of the toy RLVR experiment: one-line verdicts, ``results.md`` and the plots.

Every function reads the ``results.json`` dictionary (``res``) that
``experiments/toy_rlvr.py`` writes, so a report can be redrawn from a saved run.
Sections present in ``res["measurements"]`` are reported; ``(a)``-``(g)`` are the
sparse-vs-full sections (:mod:`toy_sparse`), ``(h)`` the LoRA arms (:mod:`toy_lora`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from toy_runs import fmt_pct


def verdicts(m: dict[str, Any]) -> dict[str, str]:
    """One line per measurement present in ``m``, from the numbers."""
    out = sparse_verdicts(m) if "a" in m else {}
    if "h" in m:
        from toy_lora import lora_verdict
        out["h"] = lora_verdict(m["h"])
    return out


def sparse_verdicts(m: dict[str, Any]) -> dict[str, str]:
    """The verdicts of (a)-(g)."""
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
    lines.append("")
    if "a" in m:
        lines += sparse_markdown(m, v)
    if "h" in m:
        from toy_lora import lora_markdown
        lines += lora_markdown(m["h"], v["h"])
    lines += ["Plots: `accuracy_vs_step.png`, `accuracy_vs_trainable.png`.", ""]
    from sparsejax.runs import run_dir
    run_dir.atomic_write_text(path, "\n".join(lines))


def sparse_markdown(m: dict[str, Any], v: dict[str, str]) -> list[str]:
    """The lines of sections (a)-(g)."""
    a, b, c, d, e, f, g = (m[k] for k in "abcdefg")
    lines = ["## (a) 99% random sparse vs full finetuning", "",
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
              "", f"**Verdict:** {v['g']}", ""]
    return lines


def plot(out_dir: str, res: dict[str, Any]) -> list[str]:
    """``accuracy_vs_step.png`` (every run's curve) and ``accuracy_vs_trainable.png``
    (final accuracy against the trainable fraction, one marker per kind of run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.get_cmap("tab20").colors
    dashes = {"full": "-", "random": "--", "diff_mask": "-.", "entropy": ":",
              "lora": (0, (5, 1, 1, 1)), "masked_lora": (0, (3, 1, 1, 1, 1, 1)),
              "uniform_lora": (0, (2, 2)), "partial_lora": (0, (1, 2)),
              "targeted_lora": (0, (4, 2, 1, 2))}
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
    styles = {"full": "s", "random": "o", "diff_mask": "D", "entropy": "^", "lora": "v",
              "masked_lora": "P", "uniform_lora": "d", "partial_lora": "*",
              "targeted_lora": "X"}
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

