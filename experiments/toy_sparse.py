"""Sections (a)-(g) of the toy RLVR experiment: sparse vs full GRPO and its measurements.

:func:`run_sparse_sections` runs full finetuning, random per-tensor masks (several
seeds at 99%, one per higher sparsity, plus a global draw where per-tensor leaves
nothing), the full run's diff-mask subnetwork and the top-20%-entropy-token run, and
returns the measurements (a)-(g) (see ``experiments/toy_rlvr.py``'s docstring).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from toy_runs import Experiment, RunResult, device_copy, sparsity_name, total_params

from sparsejax import analysis
from sparsejax import masks as masks_lib
from sparsejax.models import save_hf


def planned_runs(preset: Any) -> int:
    """How many runs :func:`run_sparse_sections` starts (before any global draw)."""
    return 1 + len(preset.mask_seeds) + len(preset.sparsities) - 1 + 2


def run_sparse_sections(exp: Experiment, lrs: dict[float, float],
                        runs: dict[str, RunResult], done: Callable[[RunResult], None],
                        extra_run: Callable[[], None]) -> dict[str, Any]:
    """Runs (a)-(g) from ``exp``'s SFT base; ``done(result)`` records each run in
    ``runs``; ``extra_run()`` announces a run beyond :func:`planned_runs`. Returns the
    measurements ``{"a": ..., ..., "g": ...}``."""
    preset = exp.p
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
            extra_run()
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
    return m


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

