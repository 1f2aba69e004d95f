"""Predict a sparse run's mask from the first checkpoints of a dense one (BSR-AdamW).

BSR-AdamW ("Winning at the RL Casino") scores every weight from the early trajectory of a
dense finetune, ``w_0`` (the base model), ``w_1, ..., w_T`` (its first snapshots), and
keeps the global top-k as the mask of the sparse run. :func:`predict_mask` does that from
Hugging Face checkpoint folders:

1. every folder is checked first, from the headers only: each holds a tensor for every
   parameter of the model the base's ``config.json`` describes, in the shape it implies
   (tensors the model does not use, such as a tied ``lm_head.weight``, are ignored);
2. a streaming scorer (:mod:`sparsejax.analysis.scorers`: ``magnitude`` ``|w_T - w_0|``,
   ``momentum`` the bias-corrected EMA of the deltas, ``variance`` Welford statistics)
   reads the folders one tensor at a time;
3. the scores are laid out as the model's parameters (HF ``(out, in)`` weights transposed
   to the ``(in, out)`` kernels, MoE experts stacked) with the name table of
   :mod:`sparsejax.models.hf_io`, and :func:`sparsejax.masks.topk_mask` keeps exactly
   ``k = round((1 - sparsity) * N)`` entries over the ``N`` entries of the eligible
   tensors (all by default; ``include`` / ``exclude`` regexes on the mask's tensor paths,
   as :func:`sparsejax.masks.random_mask` takes them); ineligible tensors keep none.

The mask is in the structure of the model's parameters, so the file
:func:`write_prediction` saves loads with ``--mask-path`` (the trainers'
:func:`sparsejax.masks.load_mask` with ``like=params``) as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsejax.analysis.checkpoints import AnalysisError, CheckpointReader
from sparsejax.analysis.scorers import make_scorer
from sparsejax.types import PyTree

__all__ = ["MaskPrediction", "check_trajectory", "param_layout", "predict_mask",
           "write_prediction"]


@dataclasses.dataclass
class MaskPrediction:
    """A predicted mask and what it keeps.

    Attributes:
        mask: sorted int32 flat indices per parameter, in the params' structure.
        per_tensor: mask tensor path -> ``(kept, numel)``, eligible tensors only.
        kept, eligible, total: entries kept, entries of the eligible tensors, all entries.
        settings: how it was made (folders, scorer, sparsity, selection).
    """

    mask: PyTree
    per_tensor: dict[str, tuple[int, int]]
    kept: int
    eligible: int
    total: int
    settings: dict[str, Any]

    def density_range(self) -> tuple[float, float]:
        """The lowest and highest per-tensor density among the eligible tensors."""
        densities = [k / n for k, n in self.per_tensor.values() if n] or [0.0]
        return min(densities), max(densities)

    def summary(self) -> str:
        """One line: entries kept, eligible tensors, the per-tensor density range."""
        low, high = self.density_range()
        return (f"kept {self.kept:,} of {self.eligible:,} eligible entries "
                f"(density {self.kept / max(self.eligible, 1):.6f}; "
                f"{len(self.per_tensor)} of {self.settings['num_tensors']} tensors eligible, "
                f"{self.total:,} entries in all); per-tensor density {low:.6f} to {high:.6f}")


def param_layout(base: str | os.PathLike) -> tuple[Any, list[tuple[str, str, bool, tuple]]]:
    """The model's abstract params and, per parameter, ``(dotted path, HF name, transpose,
    shape)`` (an HF name with ``{e}`` is a stack of experts along axis 0).

    Raises:
        AnalysisError: one line if ``base`` has no usable ``config.json``.
    """
    from flax import nnx

    from sparsejax.models.config import from_hf_config
    from sparsejax.models.decoder import Decoder
    from sparsejax.models.hf_io import param_to_hf

    folder = os.fspath(base)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise AnalysisError(f"base model folder {folder}: no config.json")
    try:
        config = from_hf_config(folder)
    except (NotImplementedError, ValueError, KeyError, TypeError) as e:
        raise AnalysisError(f"base model folder {folder}: unusable config.json "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    _, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    layout = []
    for path, var in nnx.to_flat_state(abstract):
        dotted = ".".join(map(str, path))
        name, transpose = param_to_hf(dotted)
        layout.append((dotted, name, transpose, tuple(int(d) for d in var.shape)))
    return abstract, layout


def _hf_shape(shape: tuple, transpose: bool, stacked: bool) -> tuple:
    one = shape[1:] if stacked else shape
    return tuple(reversed(one)) if transpose else one


def _needed(layout: list[tuple[str, str, bool, tuple]]) -> dict[str, tuple[tuple, str]]:
    """HF tensor name -> (its shape, the parameter it fills), for every parameter."""
    out = {}
    for dotted, name, transpose, shape in layout:
        stacked = "{e}" in name
        for hf in ([name.format(e=e) for e in range(shape[0])] if stacked else [name]):
            out[hf] = (_hf_shape(shape, transpose, stacked), dotted)
    return out


def check_trajectory(base: str, snapshots: Sequence[str],
                     layout: list[tuple[str, str, bool, tuple]]) -> None:
    """Checks the folders from their headers: each holds every tensor the model's
    parameters need, in the shape the base's ``config.json`` implies (tensors the model
    does not use, such as a tied ``lm_head.weight``, are ignored). Raises a one-line
    :class:`AnalysisError` naming the folder and the tensor that do not fit."""
    if not snapshots:
        raise AnalysisError("give at least one snapshot folder after the base model")
    needed = _needed(layout)
    for i, folder in enumerate([base, *snapshots]):
        what = f"base model folder {folder}" if i == 0 else f"snapshot {folder}"
        with CheckpointReader(folder) as reader:
            have = set(reader.names())
            for hf, (want, dotted) in needed.items():
                if hf not in have:
                    raise AnalysisError(f"{what}: no tensor {hf} (parameter {dotted})")
                if reader.shape(hf) != want:
                    raise AnalysisError(
                        f"{what}: tensor {hf} has shape {reader.shape(hf)}, "
                        f"{'its config.json implies' if i == 0 else 'the base has'} {want}")


def _selector(include: Sequence[str] | None, exclude: Sequence[str] | None):
    def compiled(patterns, flag):
        out = []
        for p in patterns or ():
            try:
                out.append(re.compile(p))
            except re.error as e:
                raise AnalysisError(f"{flag} {p!r}: not a regular expression ({e})") from None
        return out

    inc, exc = compiled(include, "--include"), compiled(exclude, "--exclude")
    return lambda path: ((not inc or any(p.search(path) for p in inc))
                         and not any(p.search(path) for p in exc))


def predict_mask(base: str | os.PathLike, snapshots: Sequence[str | os.PathLike], *,
                 score: str = "momentum", sparsity: float | None = None,
                 density: float | None = None, include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None,
                 scorer_options: dict[str, Any] | None = None,
                 progress: bool = False) -> MaskPrediction:
    """The global top-k mask of the trajectory ``base, *snapshots`` (see the module doc).

    Args:
        base: the base model's HF folder (``config.json`` and safetensors), ``w_0``.
        snapshots: the dense run's HF snapshot folders in step order, ``w_1 .. w_T``.
        score: ``"magnitude"``, ``"momentum"`` or ``"variance"``.
        sparsity, density: exactly one; the fraction of eligible entries frozen, in
            ``[0, 1)``, or kept, in ``(0, 1]``.
        include, exclude: regexes (``re.search``) on the mask's tensor paths (e.g.
            ``layers/0/attn/q_proj/kernel/value``); a tensor is eligible if it matches an
            ``include`` (or none is given) and no ``exclude``.
        scorer_options: keyword arguments of the scorer (``beta`` or ``window`` for
            momentum; ``score`` and ``eps`` for variance).
        progress: print a line to stderr per checkpoint read.

    Raises:
        AnalysisError: one line, for bad settings or folders that do not fit.
    """
    from sparsejax.masks import topk_mask
    from sparsejax.masks.core import leaves_with_paths, unflatten

    if (sparsity is None) == (density is None):
        raise AnalysisError("give exactly one of sparsity and density")
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise AnalysisError(f"sparsity must be in [0, 1), got {sparsity}")
    if density is not None and not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise AnalysisError(f"density must be in (0, 1], got {density}")
    keep_sparsity = float(sparsity) if sparsity is not None else 1.0 - float(density)
    base = os.fspath(base)
    snapshots = [os.fspath(s) for s in snapshots]
    try:
        scorer = make_scorer(score, **(scorer_options or {}))
    except (TypeError, ValueError) as e:
        raise AnalysisError(f"--score {score}: {e}") from None
    selected = _selector(include, exclude)
    for folder in [base, *snapshots]:
        if not os.path.isdir(folder):
            raise AnalysisError(f"checkpoint folder not found: {folder}")
    abstract, layout = param_layout(base)
    if not any(selected(p) for p in leaves_with_paths(abstract)[0]):
        raise AnalysisError("no tensor is eligible (check --include / --exclude)")
    check_trajectory(base, snapshots, layout)

    names = sorted(_needed(layout))
    for i, folder in enumerate([base, *snapshots]):
        scorer.update(folder, names=names)
        if progress:
            print(f"predict-mask: read {i + 1}/{len(snapshots) + 1}: {folder}", file=sys.stderr)
    hf_scores = scorer.scores()
    del scorer
    from flax import nnx
    for (_, name, transpose, shape), (_, var) in zip(layout, nnx.to_flat_state(abstract),
                                                     strict=True):
        if "{e}" in name:
            leaf = np.stack([hf_scores[name.format(e=e)].T if transpose
                             else hf_scores[name.format(e=e)] for e in range(shape[0])])
        else:
            leaf = hf_scores[name].T if transpose else hf_scores[name]
        var.set_value(np.ascontiguousarray(leaf, np.float32))
    del hf_scores
    paths, leaves, treedef = leaves_with_paths(abstract)
    eligible = {p: x for p, x in zip(paths, leaves) if selected(p)}
    chosen = topk_mask(eligible, keep_sparsity)
    empty = np.zeros((0,), np.int32)
    mask = unflatten(treedef, [chosen.get(p, empty) for p in paths])
    per_tensor = {p: (int(chosen[p].size), int(x.size)) for p, x in eligible.items()}
    settings = {
        "base": base, "snapshots": snapshots, "score": score,
        "scorer_options": dict(scorer_options or {}),
        "sparsity": sparsity, "density": density, "include": list(include or []),
        "exclude": list(exclude or []), "selection": "global top-k", "num_tensors": len(paths),
    }
    return MaskPrediction(mask, per_tensor, sum(k for k, _ in per_tensor.values()),
                          sum(n for _, n in per_tensor.values()),
                          sum(int(x.size) for x in leaves), settings)


def write_prediction(prediction: MaskPrediction, out: str, json_path: str) -> None:
    """Saves the mask (:func:`sparsejax.masks.save_mask`, metadata ``total``, ``source``,
    ``score``) and a JSON sidecar of the settings and per-tensor counts."""
    from sparsejax.masks import save_mask
    s = prediction.settings
    low, high = prediction.density_range()
    try:
        save_mask(out, prediction.mask, metadata={
            "total": str(prediction.total), "source": "predict-mask", "score": s["score"],
            "eligible": str(prediction.eligible), "snapshots": str(len(s["snapshots"]))})
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"command": "predict-mask", "out": out, **s,
                       "kept": prediction.kept, "eligible": prediction.eligible,
                       "total": prediction.total,
                       "per_tensor_density": {"min": low, "max": high},
                       "per_tensor": {p: {"kept": k, "numel": n}
                                      for p, (k, n) in prediction.per_tensor.items()}},
                      f, indent=2)
            f.write("\n")
    except OSError as e:
        raise AnalysisError(f"cannot write {e.filename or out}: {e.strerror or e}") from None
