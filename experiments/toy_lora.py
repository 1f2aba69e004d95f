"""Section (h) of the toy RLVR experiment: LoRA, masked LoRA, Partial-LoRA, Targeted-LoRA.

Partial-LoRA (arXiv 2512.22495) at toy scale, beside full finetuning and the 99%
random mask, all from the same SFT base and with the same GRPO settings:

1. **ratios** (:func:`derive_toy_ratios`): :func:`sparsejax.lora.derive_ratios` on the
   SFT base, one adapted kernel at a time, SVD-leverage importance, metric = greedy
   accuracy on a few-shot split of its own (disjoint from the SFT-dev, test and GRPO
   prompts); written to ``<out-dir>/lora_ratios.json`` (the ``--lora-ratios FILE``
   format the trainers take);
2. **arms** (:func:`arm_trainable`), each built by the trainers' own flag path
   (an :class:`~sparsejax.config.AdapterConfig`, checked as the ``--adapter`` flags are, and
   ``sparsejax.trainable.build_trainable`` -> :class:`sparsejax.trainable.LoraAdapter`
   with a :mod:`sparsejax.lora` mask), so the toy runs exactly what
   ``grpo.py --adapter ...`` runs: dense LoRA; masked LoRA (random factor masks at
   one fixed density); masked LoRA at one uniform density with Partial-LoRA's
   budget (:func:`matched_density`: is the per-layer ratio what matters?);
   Partial-LoRA (random factor masks at the derived per-kernel ratios);
   Targeted-LoRA (the most important factor entries at the same ratios);
3. **seeds**: every arm (full FT and the 99% mask included) runs once per seed ``s``
   of ``lora_seeds``, with GRPO sampling seed ``seed + s`` and adapter init / mask
   seed ``s``, so the mean and spread are over sampling and init together.

The measurement (:func:`lora_measurement`) is one row per arm: trainable entries,
their share of the model and of dense LoRA, final held-out accuracy and the last
steps' train reward (mean, sample std over seeds).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from toy_runs import Experiment, RunResult, device_copy, fmt_pct
from tqdm import tqdm

from sparsejax import lora
from sparsejax.cli.checks import check_ratios_file
from sparsejax.config import AdapterConfig
from sparsejax.data import toy_task as tt
from sparsejax.trainable.lora import LoraAdapter

# (arm key, --adapter value, label) in the order of the table.
ARMS = (("full", None, "full FT"), ("random99", None, "random 99% mask"),
        ("lora", "lora", "LoRA"), ("masked_lora", "lora", "masked LoRA"),
        ("uniform_lora", "lora", "masked LoRA at Partial-LoRA's budget"),
        ("partial_lora", "partial-lora", "Partial-LoRA"),
        ("targeted_lora", "targeted-lora", "Targeted-LoRA"))
REWARD_TAIL = 10  # train reward: mean of the last this many GRPO steps


def fewshot_problems(exp: Experiment, n: int) -> list[tt.Problem]:
    """The ratio derivation's few-shot split: disjoint from every other split."""
    return tt.make_problems(n, seed=exp.seed * 1000 + 4, digits=exp.p.digits,
                            exclude=exp.sft_dev + exp.test + exp.train)


def derive_toy_ratios(exp: Experiment, path: str, *, progress: bool = False) -> lora.Ratios:
    """Partial-LoRA's per-kernel ratios of ``exp``'s SFT base, saved to ``path``.

    Raises ValueError when the base is at accuracy 0 on the few-shot split (a
    relative threshold is then undefined)."""
    p = exp.p
    fewshot = fewshot_problems(exp, p.lora_fewshot)
    base = device_copy(exp.base)
    paths = lora.select_targets(base, p.lora_targets)

    def metric(params: Any) -> float:
        return tt.greedy_accuracy(exp.graphdef, params, exp.tokenizer, fewshot,
                                  digits=p.digits, batch_size=len(fewshot))

    bar = tqdm(total=len(paths), desc="Partial-LoRA ratios", disable=not progress,
               leave=False)
    ratios = lora.derive_ratios(
        base, metric, paths, importance="leverage", svd_rank=p.lora_svd_rank,
        threshold=p.lora_threshold, step=p.lora_ratio_step, max_sparsity=p.lora_max_sparsity,
        model=f"sparsejax.data.toy_task seed {exp.seed}", progress=lambda _: bar.update(1))
    bar.close()
    lora.save_ratios(path, ratios)
    return ratios


def adapter_config(exp: Experiment, adapter: str, *, seed: int, density: float = 1.0,
                   ratios_path: str | None = None) -> AdapterConfig:
    """The adapter settings of an arm (what ``--adapter`` / ``--lora-*`` give), checked as
    the scripts check them."""
    p = exp.p
    config = AdapterConfig(kind=adapter, lora_rank=p.lora_rank, lora_alpha=p.lora_alpha,
                           lora_rslora=False, lora_targets=",".join(p.lora_targets),
                           lora_density=density, lora_ratios=ratios_path, lora_seed=seed)
    if adapter != "lora":
        check_ratios_file(ratios_path)
    return config


def matched_density(ratios: lora.Ratios) -> float:
    """The one density whose masked LoRA trains as many factor entries as Partial-LoRA
    at ``ratios`` (a kernel ``[in, out]`` has ``r (in + out)`` factor entries)."""
    sizes = {p: sum(ratios.kernels[p]) for p in ratios.ratios}
    return sum((1 - r) * sizes[p] for p, r in ratios.ratios.items()) / sum(sizes.values())


def arm_trainable(exp: Experiment, arm: str, lr: float, *, seed: int,
                ratios_path: str | None) -> LoraAdapter:
    """The :class:`~sparsejax.trainable.LoraAdapter` of a LoRA arm (the scripts' own path)."""
    adapter = dict((k, a) for k, a, _ in ARMS)[arm]
    density = 1.0
    if arm == "masked_lora":
        density = exp.p.lora_density
    elif arm == "uniform_lora":
        density = matched_density(lora.load_ratios(ratios_path, exp.base))
    from sparsejax.trainable import build_trainable
    config = adapter_config(exp, adapter, seed=seed, density=density,
                            ratios_path=None if adapter == "lora" else ratios_path)
    return build_trainable(exp.sparse_config(0.0, lr), device_copy(exp.base), adapter=config)


def run_lora_section(exp: Experiment, lrs: dict[float, float], lora_lr: float,
                     runs: dict[str, RunResult], done: Callable[[RunResult], None],
                     ratios_path: str, *, progress: bool = False,
                     ratios: lora.Ratios | None = None,
                     arms: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Derives the ratios (unless given, then saved to ``ratios_path``) and runs every
    arm (of ``arms``, default all of :data:`ARMS`) for every seed; returns the
    measurement (h). Seed 0's full-FT and 99%-mask runs are taken from ``runs`` when
    (a)-(g) already ran them (same settings)."""
    p = exp.p
    t0 = time.perf_counter()
    derive_error = None
    if ratios is None:
        try:
            ratios = derive_toy_ratios(exp, ratios_path, progress=progress)
        except ValueError as e:
            derive_error = str(e).splitlines()[0]
    else:
        lora.save_ratios(ratios_path, ratios)
    derive_seconds = time.perf_counter() - t0
    per_arm: dict[str, list[RunResult]] = {k: [] for k, _, _ in ARMS}
    for s in p.lora_seeds:
        sampling = exp.seed + s
        for arm, _, label in ARMS:
            if (ratios is None and arm in ("uniform_lora", "partial_lora", "targeted_lora")) or (
                    arms is not None and arm not in arms):
                continue
            reuse = {"full": "full", "random99": "random 99% seed 0"}.get(arm)
            if s == 0 and reuse in runs and runs[reuse].sampling_seed == sampling:
                per_arm[arm].append(runs[reuse])
                continue
            name = f"[h] {label} seed {s}"
            if arm == "full":
                r = exp.run(name, "full", 0.0, lrs[0.0], sampling_seed=sampling)[0]
            elif arm == "random99":
                r = exp.run(name, "random", 0.99, lrs[0.99], mask_seed=s,
                            sampling_seed=sampling)[0]
            else:
                trainable = arm_trainable(exp, arm, lora_lr, seed=s, ratios_path=ratios_path)
                n_lora = trainable.num_trainable(None)
                full_lora = lora.num_parameters(trainable.initial_adapters)
                r = exp.run(name, arm, 1.0 - n_lora / full_lora, lora_lr, mask_seed=s,
                            trainable=trainable, sampling_seed=sampling)[0]
            done(r)
            per_arm[arm].append(r)
    return lora_measurement(exp, per_arm, ratios, ratios_path, derive_seconds, derive_error)


def _stats(xs: list[float]) -> dict[str, Any]:
    xs = [float(x) for x in xs]
    return {"values": xs, "mean": float(np.mean(xs)) if xs else None,
            "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else None}


def lora_measurement(exp: Experiment, per_arm: dict[str, list[RunResult]],
                     ratios: lora.Ratios | None, ratios_path: str, derive_seconds: float,
                     derive_error: str | None) -> dict[str, Any]:
    """The rows of (h) and the ratios they used."""
    p = exp.p
    dense = per_arm["lora"][0].trainable if per_arm["lora"] else None
    rows = []
    for arm, adapter, label in ARMS:
        rs = per_arm[arm]
        if not rs:
            continue
        tail = [float(np.nanmean(r.train_reward[-REWARD_TAIL:])) for r in rs]
        rows.append({
            "arm": arm, "label": label + (f" r{p.lora_rank}" if adapter else "")
            + (f" {100 * p.lora_density:g}%" if arm == "masked_lora" else "")
            + (f" ({100 * matched_density(ratios):.1f}%)" if arm == "uniform_lora" else ""),
            "adapter": adapter, "trainable": rs[0].trainable,
            "trainable_per_seed": [r.trainable for r in rs],
            "fraction_of_model": rs[0].trainable / exp.total,
            "fraction_of_lora": None if dense is None else rs[0].trainable / dense,
            "learning_rate": rs[0].learning_rate, "runs": [r.name for r in rs],
            "accuracy": _stats([r.final_accuracy for r in rs]), "train_reward": _stats(tail)})
    out = {"seeds": list(p.lora_seeds), "base": exp.base_accuracy, "total_params": exp.total,
           "lora_rank": p.lora_rank, "lora_alpha": p.lora_alpha,
           "lora_targets": list(p.lora_targets), "masked_density": p.lora_density,
           "rows": rows, "tolerance": p.works_within, "reward_tail_steps": REWARD_TAIL,
           "ratios_file": os.path.basename(ratios_path), "derive_seconds": derive_seconds,
           "derive_error": derive_error}
    if ratios is not None:
        out.update(ratios=ratios.ratios, ratio_settings=ratios.settings,
                   matched_density=matched_density(ratios),
                   fewshot=p.lora_fewshot, fewshot_baseline=ratios.baseline,
                   mean_ratio=float(np.mean(list(ratios.ratios.values()))))
    return out


def _row(h: dict[str, Any], arm: str) -> dict[str, Any] | None:
    return next((r for r in h["rows"] if r["arm"] == arm), None)


def _pm(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "n/a"
    return fmt_pct(s["mean"]) + ("" if s["std"] is None else f" ± {100 * s['std']:.1f}")


def lora_verdict(h: dict[str, Any]) -> str:
    """One line on the paper's three claims, from the numbers of (h)."""
    lo, pa, ta, ma, un = (_row(h, k) for k in ("lora", "partial_lora", "targeted_lora",
                                                "masked_lora", "uniform_lora"))
    tol = h["tolerance"]
    parts = []
    if lo and pa:
        d = pa["accuracy"]["mean"] - lo["accuracy"]["mean"]
        parts.append(f"Partial-LoRA trains {fmt_pct(1 - pa['fraction_of_lora'], 0)} fewer "
                     f"entries than LoRA at {100 * d:+.1f} points of accuracy ("
                     + ("equal" if abs(d) <= tol else "better" if d > 0 else "worse")
                     + f" within {100 * tol:.0f} points)")
    else:
        parts.append(f"no Partial-LoRA arms ({h.get('derive_error') or 'no ratios'})")
    if pa and ta:
        d = pa["accuracy"]["mean"] - ta["accuracy"]["mean"]
        parts.append(f"random (Partial) vs targeted entries at the same ratios: "
                     f"{100 * d:+.1f} points")
    if un and pa:
        parts.append(f"derived per-layer ratios vs one uniform density at the same budget: "
                     f"{100 * (pa['accuracy']['mean'] - un['accuracy']['mean']):+.1f} points")
    if ma and pa:
        parts.append(f"uniform density {100 * h['masked_density']:g}% "
                     f"({fmt_pct(ma['fraction_of_lora'], 0)} of LoRA) vs the derived "
                     f"ratios ({fmt_pct(pa['fraction_of_lora'], 0)} of LoRA): "
                     f"{100 * (ma['accuracy']['mean'] - pa['accuracy']['mean']):+.1f} points")
    return "; ".join(parts) + f" (means over {len(h['seeds'])} seeds)."


def lora_markdown(h: dict[str, Any], verdict: str) -> list[str]:
    """The lines of section (h)."""
    lines = ["## (h) LoRA, masked LoRA, Partial-LoRA, Targeted-LoRA", ""]
    if h.get("ratios") is not None:
        st = h["ratio_settings"]
        how = (f"{st['importance']} importance (SVD rank {st['svd_rank']}), step "
               f"{st['step']:g} up to {st['max_sparsity']:g}, threshold {st['threshold']:g} "
               f"x the base's few-shot accuracy {fmt_pct(h['fewshot_baseline'])} on "
               f"{h['fewshot']} problems" if "step" in st else "given, not derived")
        lines += [f"Ratios (`{h['ratios_file']}`): {how}; mean ratio "
                  f"{h['mean_ratio']:.2f}; {h['derive_seconds']:.0f} s.", "",
                  "| kernel | ratio |", "|---|---:|"]
        lines += [f"| {k} | {v:g} |" for k, v in h["ratios"].items()]
        lines.append("")
    else:
        lines += [f"Ratios not derived: {h['derive_error']}", ""]
    lines += [f"Seeds {h['seeds']} (GRPO sampling and adapter init / mask); accuracy = "
              f"held-out greedy exact match; reward = mean train reward of the last "
              f"{h['reward_tail_steps']} steps; ± = sample std over seeds.", "",
              "| arm | trainable params | % of model | % of LoRA | LR | final accuracy | "
              "train reward |", "|---|---:|---:|---:|---:|---:|---:|",
              f"| SFT base (no RL) | 0 | 0 | - | - | {fmt_pct(h['base'])} | - |"]
    for r in h["rows"]:
        of_lora = "-" if r["fraction_of_lora"] is None else fmt_pct(r["fraction_of_lora"])
        rw = r["train_reward"]
        reward = "n/a" if rw["mean"] is None else (
            f"{rw['mean']:.3f}" + ("" if rw["std"] is None else f" ± {rw['std']:.3f}"))
        lines.append(f"| {r['label']} | {r['trainable']:,} | "
                     f"{fmt_pct(r['fraction_of_model'], 2)} | {of_lora} | "
                     f"{r['learning_rate']:g} | {_pm(r['accuracy'])} | {reward} |")
    lines += ["", f"**Verdict:** {verdict}", ""]
    return lines
