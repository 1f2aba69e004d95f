"""The papers' experiments as arms of a :class:`~sparsejax.reproduce.suite.Suite` and the
numbers each claim is judged by.

* :func:`multiple_tickets` (Multiple Ticket Hypothesis, arXiv 2602.01599): full
  finetuning vs three independent random per-tensor masks at 99% (their pairwise Jaccard
  beside the random baseline, the spread of their accuracies) and a sparsity sweep
  99.9% / 99.99%, with the learning rate growing with sparsity.
* :func:`subnetworks` (Mukherjee et al., arXiv 2505.11711): the full run's update
  sparsity (bf16 and float32 at ``|delta| <= 1e-5``) per layer and matrix type, update
  rank; the subnetwork retrained from the full run's diff mask (same data, steps and LR);
  where theta_sub equals theta_full; the overlap of two full runs' subnetworks.
* :func:`predicted_masks` (BSR-AdamW): a dense warm-up with Hugging Face snapshots, a
  momentum-scored global top-k mask at 97.5% and 99%, sparse runs from the base with
  them vs random masks of the same size, the Jaccard with the full run's subnetwork and
  the step time vs dense.
* :func:`alternatives` (optional): other ways to train little, beside full finetuning
  and a random 99% mask: the policy gradient on the top 20% highest-entropy tokens only
  (Beyond the 80/20 rule, arXiv 2506.01939), LoRA with the random mask's budget, and
  masked LoRA of 4x the rank with a random quarter of its factor entries (Partial-LoRA,
  arXiv 2512.22495, with one ratio for every kernel) at the same budget.

Each returns an :class:`Outcome`: tables (rows of dicts), curves (arm -> eval accuracy
over steps) and verdicts. Accuracies are compared against a noise level: the larger of
the binomial standard error of an accuracy on the evaluation set and the spread (std) of
the 99% masks' accuracies.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Any

import numpy as np

from sparsejax.reproduce.suite import ArmResult, Suite

TICKETS = 3
SWEEP = (0.999, 0.9999)
BSR_SPARSITIES = (0.975, 0.99)
TOLERANCES = (1e-5, 1e-4)
TOP_ENTROPY_QUANTILE = 0.2
MASKED_LORA_DENSITY = 0.25  # masked LoRA: rank / density x LoRA's rank, same budget


@dataclasses.dataclass
class Outcome:
    """What an experiment found: ``tables`` (name -> rows), ``curves`` (arm -> [(step,
    accuracy)]), ``verdicts`` (claim -> {"verdict", "evidence"}) and ``arms`` (name ->
    folder)."""

    experiment: str
    tables: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    verdicts: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    arms: dict[str, str] = dataclasses.field(default_factory=dict)

    def add_arms(self, *arms: ArmResult) -> None:
        for arm in arms:
            self.arms[arm.name] = arm.out_dir
            self.curves[arm.name] = arm.curve()

    def judge(self, claim: str, verdict: str, evidence: str) -> None:
        self.verdicts[claim] = {"verdict": verdict, "evidence": evidence}


# ----------------------------------------------------------------------------- shared arms


def full_arm(suite: Suite, seed: int = 0) -> ArmResult:
    """Full finetuning (the baseline every experiment compares with); the seed-0 run also
    scores the base model before its first step."""
    return suite.arm("full" if seed == 0 else f"full_seed{seed}", sparsity=0.0, seed=seed,
                     extra=("--eval-on-start",) if seed == 0 else ())


def random_arm(suite: Suite, sparsity: float, mask_seed: int = 0) -> ArmResult:
    return suite.arm(f"random{_tag(sparsity)}_mask{mask_seed}", sparsity=sparsity,
                     mask_seed=mask_seed)


def _tag(sparsity: float) -> str:
    return f"{100 * sparsity:g}"


def base_accuracy(full: ArmResult) -> float:
    """The step-0 evaluation of the full run (the base model)."""
    for step, accuracy in full.curve():
        if step == 0:
            return accuracy
    raise ValueError(f"{full.out_dir} has no step-0 evaluation")


def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy on ``n`` problems (``accuracy``
    clipped to ``[1/n, 1 - 1/n]``, so that 0 and 1 do not claim certainty)."""
    n = max(n, 1)
    p = min(max(accuracy, 1 / n), 1 - 1 / n) if n > 1 else 0.5
    return math.sqrt(p * (1 - p) / n)


def arm_row(arm: ArmResult, total: int | None = None) -> dict[str, Any]:
    row = {"arm": arm.name, "sparsity": arm.sparsity, "lr": arm.learning_rate,
           "final_accuracy": arm.accuracy,
           "best_accuracy": max((a for _, a in arm.curve()), default=arm.accuracy),
           "step_time_s": arm.step_time()}
    if os.path.exists(arm.mask_file):
        from sparsejax.masks import load_mask, num_active
        mask, meta = load_mask(arm.mask_file)
        row["trainable"] = num_active(mask)
        row["total"] = int(meta.get("total", total or 0))
        row["sparsity"] = 1 - row["trainable"] / row["total"]
    trainable = next((r["trainable"] for r in arm.records if r.get("kind") == "config"
                      and "trainable" in r), None)
    if "trainable" not in row and trainable is not None:
        row["trainable"] = int(trainable)
    return row


def _load_mask(path: str):
    from sparsejax.masks import load_mask
    return load_mask(path)


def _total(meta: dict[str, str]) -> int:
    return int(meta["total"])


# ----------------------------------------------------------------------------- experiments


def multiple_tickets(suite: Suite) -> Outcome:
    """Multiple Ticket Hypothesis: many random 99% masks each match full finetuning."""
    from sparsejax.masks import jaccard, random_baselines
    out = Outcome("multiple_tickets")
    full = full_arm(suite)
    tickets = [random_arm(suite, 0.99, j) for j in range(TICKETS)]
    sweep = [random_arm(suite, s) for s in SWEEP]
    out.add_arms(full, *tickets, *sweep)
    base = base_accuracy(full)
    out.tables["accuracy"] = [{"arm": "base model", "final_accuracy": base}] + [
        arm_row(a) for a in (full, *tickets, *sweep)]
    masks = [_load_mask(t.mask_file) for t in tickets]
    pairs = []
    for (i, (a, meta)), (j, (b, _)) in itertools.combinations(enumerate(masks), 2):
        pairs.append({"masks": f"{i}-{j}", "jaccard": jaccard(a, b),
                      "random_baseline": random_baselines(a, b, _total(meta))["jaccard"]})
    out.tables["ticket_overlap"] = pairs

    accs = np.asarray([t.accuracy for t in tickets])
    noise = max(float(accs.std()), standard_error(full.accuracy, full.eval_examples))
    gain = full.accuracy - base
    evidence = (f"full {full.accuracy:.3f} (base {base:.3f}); 99% masks "
                f"{', '.join(f'{a:.3f}' for a in accs)} (mean {accs.mean():.3f}, std "
                f"{accs.std():.3f}); noise {noise:.3f}")
    if gain <= noise and accs.mean() - base <= noise:
        out.judge("random 99% masks match full finetuning", "inconclusive",
                  evidence + "; neither improved beyond the noise")
    elif accs.mean() >= full.accuracy - 2 * noise:
        out.judge("random 99% masks match full finetuning", "holds", evidence)
    else:
        out.judge("random 99% masks match full finetuning", "does not hold", evidence)
    chance = all(abs(p["jaccard"] - p["random_baseline"]) <= 0.1 * p["random_baseline"]
                 + 1e-9 for p in pairs)
    every = bool((accs - base > noise).all())
    out.judge("independent masks with chance-level overlap all work",
              "holds" if chance and every else "does not hold" if chance else "inconclusive",
              f"Jaccard {', '.join(format(p['jaccard'], '.4f') for p in pairs)} vs random "
              f"{pairs[0]['random_baseline']:.4f}; gains over base "
              f"{', '.join(f'{a - base:+.3f}' for a in accs)} (noise {noise:.3f})")
    learned = [s for s, a in zip((0.99, *SWEEP), (accs.mean(), *[a.accuracy for a in sweep]))
               if a - base > noise]
    out.judge("where sparsity breaks", "finding",
              f"improves beyond noise up to {max(learned):.4%} sparsity" if learned else
              "no sparsity improved beyond the noise")
    return out


def subnetworks(suite: Suite) -> Outcome:
    """Mukherjee et al.: RL updates a small subnetwork; retraining it alone recovers the
    full run; two runs' subnetworks overlap more than chance."""
    import ml_dtypes

    from sparsejax.analysis.update_sparsity import diff_checkpoints
    from sparsejax.masks import diff_mask, num_active, overlap, random_baselines, save_mask
    out = Outcome("subnetworks")
    full, other = full_arm(suite), full_arm(suite, seed=1)
    base_dir = suite.model
    rows = []
    for dtype in ("bfloat16", "float32"):
        report = diff_checkpoints(base_dir, full.final_model, atol=1e-5, dtype=dtype,
                                  rank=dtype == "float32").to_dict()
        rows.append({"dtype": dtype, **report["total"], "by_layer": report["by_layer"],
                     "by_type": report["by_type"]})
    out.tables["update_sparsity"] = rows

    base, first, second = (_params(p) for p in (base_dir, full.final_model, other.final_model))
    bf16 = ml_dtypes.bfloat16
    sub_mask = diff_mask(base, first, atol=1e-5, dtype=bf16)
    total = sum(int(x.size) for x in base.values())
    mask_path = suite.path("masks", "subnetwork_of_full.safetensors")
    if not os.path.exists(mask_path):
        save_mask(mask_path, _as_param_tree(sub_mask, suite), metadata={"total": total})
    sub = suite.arm("subnetwork", mask_path=mask_path, learning_rate=full.learning_rate)
    out.add_arms(full, other, sub)
    out.tables["accuracy"] = [arm_row(full), arm_row(other),
                              {**arm_row(sub), "trainable": num_active(sub_mask)}]
    theta_sub = _params(sub.final_model)
    agree = []
    for tol in TOLERANCES:
        same = sum(int((np.abs(theta_sub[k] - first[k]) <= tol).sum()) for k in first)
        on_sub = sum(int((np.abs(theta_sub[k] - first[k]).reshape(-1)[
            np.asarray(sub_mask[k])] <= tol).sum()) for k in first)
        agree.append({"tolerance": tol, "fraction_equal_all": same / total,
                      "fraction_equal_subnetwork": on_sub / max(num_active(sub_mask), 1)})
    out.tables["theta_sub_vs_theta_full"] = agree
    other_mask = diff_mask(base, second, atol=1e-5, dtype=bf16)
    o1, o2 = overlap(sub_mask, other_mask)
    chance = random_baselines(sub_mask, other_mask, total)
    out.tables["subnetwork_overlap"] = [{"o1": o1, "o2": o2, "random_o1": chance["o1"],
                                         "random_o2": chance["o2"]}]

    sparsity = rows[0]["sparsity"]
    out.judge("RL updates a small subnetwork (bf16 update sparsity 70-95% in the paper)",
              "holds" if sparsity >= 0.7 else "does not hold",
              f"bf16 update sparsity {sparsity:.3f}, float32 {rows[1]['sparsity']:.3f}; mean "
              f"update rank {rows[1]['mean_rank_fraction']:.3f} of full rank")
    noise = standard_error(full.accuracy, full.eval_examples)
    out.judge("the subnetwork alone recovers the full run",
              "holds" if sub.accuracy >= full.accuracy - 2 * noise else "does not hold",
              f"subnetwork {sub.accuracy:.3f} vs full {full.accuracy:.3f} (noise {noise:.3f}); "
              f"theta_sub = theta_full on {agree[0]['fraction_equal_subnetwork']:.3f} of the "
              f"subnetwork at 1e-5, {agree[1]['fraction_equal_subnetwork']:.3f} at 1e-4")
    out.judge("two runs' subnetworks overlap more than chance",
              "holds" if min(o1 - chance["o1"], o2 - chance["o2"]) > 0.05 else "does not hold",
              f"o1 {o1:.3f} (random {chance['o1']:.3f}), o2 {o2:.3f} "
              f"(random {chance['o2']:.3f})")
    return out


def predicted_masks(suite: Suite) -> Outcome:
    """BSR-AdamW: masks predicted from early deltas vs random masks of the same size."""
    from sparsejax.analysis.predict_mask import predict_mask, write_prediction
    from sparsejax.masks import diff_mask, jaccard, random_baselines
    out = Outcome("predicted_masks")
    scale = suite.scale
    warm = suite.arm("warmup", sparsity=0.0, steps=scale.warmup_steps,
                     extra=("--save-hf-every", "1", "--eval-every", "0"))
    snapshots = [os.path.join(warm.out_dir, "snapshots", f"step_{s:06d}")
                 for s in range(1, scale.warmup_steps + 1)]
    full = full_arm(suite)
    import ml_dtypes
    base, final = _params(suite.model), _params(full.final_model)
    subnetwork = diff_mask(base, final, atol=1e-5, dtype=ml_dtypes.bfloat16)
    total = sum(int(x.size) for x in base.values())
    rows, overlaps = [arm_row(full)], []
    for sparsity in BSR_SPARSITIES:
        path = suite.path("masks", f"bsr_momentum_{_tag(sparsity)}.safetensors")
        if not os.path.exists(path):
            prediction = predict_mask(suite.model, snapshots, score="momentum",
                                      sparsity=sparsity)
            write_prediction(prediction, path, path + ".json")
        predicted = suite.arm(f"bsr{_tag(sparsity)}", mask_path=path,
                              learning_rate=scale.lr(sparsity))
        random = random_arm(suite, sparsity)
        out.add_arms(predicted, random)
        rows += [{**arm_row(predicted), "sparsity": sparsity}, arm_row(random)]
        mask, _ = _load_mask(path)
        overlaps.append({"sparsity": sparsity, "jaccard_with_full_subnetwork":
                         jaccard(mask, subnetwork), "random_baseline":
                         random_baselines(mask, subnetwork, total)["jaccard"]})
        noise = standard_error(random.accuracy, random.eval_examples)
        gap = predicted.accuracy - random.accuracy
        out.judge(f"a predicted {sparsity:.1%} mask beats a random one",
                  "holds" if gap > 2 * noise else "does not hold" if gap < -2 * noise
                  else "inconclusive",
                  f"predicted {predicted.accuracy:.3f} vs random {random.accuracy:.3f} vs "
                  f"full {full.accuracy:.3f} (noise {noise:.3f}); step time "
                  f"{predicted.step_time():.1f} s vs dense {full.step_time():.1f} s")
    out.add_arms(full, warm)
    out.tables["accuracy"] = rows
    out.tables["mask_overlap"] = overlaps
    return out


def lora_rank_for_budget(model: str, budget: int) -> int:
    """The LoRA rank whose factors on every projection of ``model`` hold about ``budget``
    entries (at least 1)."""
    from flax import nnx

    from sparsejax.lora.adapters import kernel_shapes
    from sparsejax.models.hf_io import load_hf
    params = nnx.split(load_hf(model, param_dtype="float32"))[1]
    per_rank = sum(din + dout for din, dout in kernel_shapes(params).values())
    return max(1, round(budget / per_rank))


def alternatives(suite: Suite) -> Outcome:
    """80/20 tokens, LoRA and masked LoRA against full finetuning and a random 99% mask."""
    from sparsejax.masks import num_active
    out = Outcome("alternatives")
    scale = suite.scale
    full, random = full_arm(suite), random_arm(suite, 0.99)
    entropy = suite.arm(f"top_entropy{100 * TOP_ENTROPY_QUANTILE:g}", sparsity=0.0,
                        extra=("--top-entropy-quantile", str(TOP_ENTROPY_QUANTILE)))
    random_mask, meta = _load_mask(random.mask_file)
    budget, total = num_active(random_mask), _total(meta)
    rank = lora_rank_for_budget(suite.model, budget)
    wide = round(rank / MASKED_LORA_DENSITY)

    def adapter(name, r, *density):
        return suite.arm(name, sparsity=0.0, learning_rate=scale.lr_lora,
                         extra=("--adapter", "lora", "--lora-rank", str(r), "--lora-alpha",
                                str(2 * r), "--lora-seed", str(suite.seed), *density))
    lora = adapter(f"lora_r{rank}", rank)
    masked = adapter(f"masked_lora_r{wide}_d{100 * MASKED_LORA_DENSITY:g}", wide,
                     "--lora-density", str(MASKED_LORA_DENSITY))
    arms = (full, random, entropy, lora, masked)
    out.add_arms(*arms)
    rows = [arm_row(a) for a in arms]
    for row in rows:
        row["budget_of_random99"] = row.get("trainable", 0) / budget
    for row in rows[-2:]:  # factor entries beside the frozen weights, as a fraction of them
        row["sparsity"] = 1 - row["trainable"] / total
    out.tables["accuracy"] = rows
    base = next((a for s, a in full.curve() if s == 0), None)
    noise = standard_error(full.accuracy, full.eval_examples)

    def versus(a, b, claim):
        """``a`` matches ``b``: not more than two noise levels below it, and both improved
        beyond the noise (matching an arm that did not learn shows nothing)."""
        gap = a.accuracy - b.accuracy
        learned = base is None or min(a.accuracy, b.accuracy) - base > noise
        out.judge(claim, "does not hold" if gap < -2 * noise else "holds" if learned
                  else "inconclusive",
                  f"{a.name} {a.accuracy:.3f} vs {b.name} {b.accuracy:.3f} (noise {noise:.3f}"
                  + (f", base {base:.3f})" if base is not None else ")"))
    versus(entropy, full, "the top-20% entropy tokens alone match all tokens (80/20)")
    versus(lora, random, "LoRA with the same budget matches a random 99% mask")
    versus(masked, lora, "masked LoRA (4x rank, 25% of entries) matches LoRA of the same "
                         "budget")
    return out


EXPERIMENTS = {"multiple_tickets": multiple_tickets, "subnetworks": subnetworks,
               "predicted_masks": predicted_masks, "alternatives": alternatives}


# ----------------------------------------------------------------------------- params


def _params(folder: str) -> dict[str, np.ndarray]:
    """A model folder's params as ``{mask path: float32 array}`` (the params' layout)."""
    from flax import nnx

    from sparsejax.masks.core import leaves_with_paths
    from sparsejax.models.hf_io import load_hf
    params = nnx.split(load_hf(folder, param_dtype="float32"))[1]
    paths, leaves, _ = leaves_with_paths(params)
    return {p: np.asarray(x, np.float32) for p, x in zip(paths, leaves)}


def _as_param_tree(mask: dict[str, np.ndarray], suite: Suite):
    """A ``{path: indices}`` mask in the params' tree structure (what ``--mask-path``
    loads)."""
    from flax import nnx

    from sparsejax.masks.core import leaves_with_paths, unflatten
    from sparsejax.models.hf_io import load_hf
    params = nnx.split(load_hf(suite.model, param_dtype="float32"))[1]
    paths, _, treedef = leaves_with_paths(params)
    return unflatten(treedef, [np.asarray(mask[p], np.int32) for p in paths])
