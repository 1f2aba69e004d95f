"""Per-layer sparsity ratios for Partial-LoRA (arXiv 2512.22495) and the masks they give.

Derivation (:func:`derive_ratios`), one adapted kernel at a time, all others intact:

1. score the entries of the pre-trained kernel ``W`` (:mod:`sparsejax.lora.importance`:
   SVD leverage, or magnitude);
2. progressively mask ``W``: at sparsity ``s = step, 2 step, ...`` (below 1 and up to
   ``max_sparsity``) the ``floor(s * numel)`` least important entries are set to zero
   (ties: lower flat index first);
3. evaluate the caller's task metric (e.g. accuracy on a few-shot set, higher is
   better) on the masked model; stop at the first ``s`` where it falls below
   ``threshold * baseline`` (default 90% of the unmasked model's value);
4. the kernel's ratio is the last sparsity that held (0 if the first step fails).

The ratio is the sparsity of that kernel's LoRA factors: Partial-LoRA draws *random*
masks at it (:func:`partial_lora_masks`); Targeted-LoRA keeps the most important
indices instead (:func:`targeted_lora_masks`: the rows of ``A`` whose input feature,
and the columns of ``B`` whose output feature, score highest).

Ratios are written to JSON with the shapes of the kernels they were derived for
(:func:`save_ratios`); :func:`load_ratios` refuses a file made for another model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib
from sparsejax.config.names import LORA_RATIOS_FORMAT
from sparsejax.lora.adapters import Adapters, Factors, _map_kernels, kernel_shapes
from sparsejax.lora.importance import IMPORTANCE, entry_importance, row_col_importance
from sparsejax.lora.masked import factor_masks

FORMAT = LORA_RATIOS_FORMAT
VERSION = 1


@dataclasses.dataclass
class Ratios:
    """Per-kernel sparsity ratios and how they were found.

    Attributes:
      ratios: ``{kernel path: sparsity in [0, 1)}`` (the LoRA factors' sparsity).
      kernels: ``{kernel path: [in, out]}`` of the model they were derived on.
      model: a free-form name of that model (checked on load when given there).
      settings: importance, svd rank, threshold, step, max_sparsity, combine.
      baseline: the metric of the unmasked model.
      curves: ``{kernel path: [[sparsity, metric], ...]}`` of every evaluation.
    """

    ratios: dict[str, float]
    kernels: dict[str, list[int]]
    model: str | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    baseline: float | None = None
    curves: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)

    def densities(self) -> dict[str, float]:
        return {p: 1.0 - r for p, r in self.ratios.items()}


def _grid(step: float, max_sparsity: float) -> list[float]:
    if not (isinstance(step, (int, float)) and 0.0 < step < 1.0):
        raise ValueError(f"ratio step must be in (0, 1), got {step!r}")
    if not (isinstance(max_sparsity, (int, float)) and 0.0 < max_sparsity < 1.0):
        raise ValueError(f"max_sparsity must be in (0, 1), got {max_sparsity!r}")
    n = int(math.floor(max_sparsity / step + 1e-9))
    return [round(j * step, 12) for j in range(1, n + 1)]


def masking_order(w, importance: str = "leverage", svd_rank: int = 8,
                  combine: str = "product") -> np.ndarray:
    """Flat indices of ``w`` from least to most important (stable: ties by index)."""
    score = entry_importance(w, importance, svd_rank, combine).reshape(-1)
    return np.argsort(score, kind="stable")


def masked_weight(w, order: np.ndarray, sparsity: float) -> np.ndarray:
    """``w`` with its ``floor(sparsity * numel)`` least important entries zeroed."""
    w = np.array(w)
    flat = w.reshape(-1)
    flat[order[:int(math.floor(sparsity * flat.size + 1e-9))]] = 0
    return flat.reshape(w.shape)


def derive_ratios(params: Any, metric: Callable[[Any], float], paths: Sequence[str], *,
                  importance: str = "leverage", svd_rank: int = 8,
                  combine: str = "product", threshold: float = 0.9, step: float = 0.1,
                  max_sparsity: float = 0.95, model: str | None = None,
                  progress: Callable[[str], None] | None = None) -> Ratios:
    """Each kernel's ratio by progressive masking (see the module docstring).

    Args:
      params: the pre-trained params (base, no adapters).
      metric: ``metric(params) -> float``, higher is better (task accuracy on a
        few-shot set); called once unmasked and at most ``len(grid)`` times per kernel.
        Jit it over ``params``: every call passes arrays of the same shapes.
      paths: the kernels to derive ratios for (e.g. ``list(adapters)``).
      importance: ``"leverage"`` or ``"magnitude"``; svd_rank, combine: see
        :mod:`sparsejax.lora.importance`.
      threshold: the metric must stay ``>= threshold * baseline``; in (0, 1].
      step, max_sparsity: the sparsity grid ``step, 2 step, ... <= max_sparsity``.
    """
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    if not (isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    grid = _grid(step, max_sparsity)
    shapes = kernel_shapes(params)
    for p in paths:
        if p not in shapes:
            raise ValueError(f"derive_ratios: this model has no kernel {p}")
    baseline = float(metric(params))
    if not baseline > 0:
        raise ValueError(f"the unmasked metric is {baseline}; a relative threshold needs "
                         "a metric > 0 (higher is better)")
    flat = {p: x for p, x in _flat_kernels(params).items() if p in paths}
    ratios, curves = {}, {}
    for p in paths:
        w = np.asarray(jax.device_get(flat[p]))
        order = masking_order(w, importance, svd_rank, combine)
        reached, curve = 0.0, []
        for s in grid:
            masked = jnp.asarray(masked_weight(w, order, s), dtype=flat[p].dtype)
            value = float(metric(_replace_kernel(params, p, masked)))
            curve.append([s, value])
            if value < threshold * baseline:
                break
            reached = s
        ratios[p], curves[p] = reached, curve
        if progress is not None:
            progress(f"{p}: ratio {reached:g} ({len(curve)} evaluations)")
    return Ratios(ratios=ratios, kernels={p: list(shapes[p]) for p in paths}, model=model,
                  settings=dict(importance=importance, svd_rank=svd_rank, combine=combine,
                                threshold=threshold, step=step, max_sparsity=max_sparsity),
                  baseline=baseline, curves=curves)


def _flat_kernels(params: Any) -> dict[str, Any]:
    out = {}
    _map_kernels(params, lambda path, x: out.setdefault(path, x))
    return out


def _replace_kernel(params: Any, path: str, value) -> Any:
    return _map_kernels(params, lambda q, x: value if q == path else x)


# ----------------------------------------------------------------------------- masks


def _ratio_for(ratios: Ratios | Mapping[str, float], path: str) -> float:
    table = ratios.ratios if isinstance(ratios, Ratios) else ratios
    if path not in table:
        raise ValueError(f"no ratio for adapted kernel {path} (the ratios cover "
                         f"{len(table)} kernels)")
    return float(table[path])


def partial_lora_masks(adapters: Adapters, ratios: Ratios | Mapping[str, float], *,
                       seed: int = 0, strategy: str = "per_tensor"):
    """Partial-LoRA: random masks on each kernel's factors at density ``1 - ratio``."""
    return factor_masks(adapters, {p: 1.0 - _ratio_for(ratios, p) for p in adapters},
                        seed=seed, strategy=strategy)


def targeted_lora_masks(adapters: Adapters, ratios: Ratios | Mapping[str, float],
                        params: Any, *, importance: str = "leverage", svd_rank: int = 8):
    """Targeted-LoRA: each factor keeps its ``round((1 - ratio) * numel)`` most important
    entries; an entry of ``A [in, r]`` scores as its input feature (row of ``W``), an
    entry of ``B [r, out]`` as its output feature (column of ``W``); ties go to the
    lower flat index (whole rows of ``A`` / columns of ``B`` first)."""
    flat = _flat_kernels(params)
    out = {}
    for p, f in adapters.items():
        if p not in flat:
            raise ValueError(f"targeted_lora_masks: this model has no kernel {p}")
        rows, cols = row_col_importance(np.asarray(jax.device_get(flat[p])), importance,
                                        svd_rank)
        r = f.a.shape[1]
        sa = np.broadcast_to(rows[:, None], f.a.shape).astype(np.float32)
        sb = np.broadcast_to(cols[None, :], (r, cols.size)).astype(np.float32)
        sparsity = _ratio_for(ratios, p)
        m = masks_lib.topk_mask({"a": sa, "b": sb}, sparsity, scope="per_tensor")
        for name in "ab":
            if m[name].size == 0:
                raise ValueError(f"ratio {sparsity} leaves no entry in factor "
                                 f"{name.upper()} of {p}")
        out[p] = Factors(m["a"], m["b"])
    return out


# ----------------------------------------------------------------------------- files


def save_ratios(path: str | os.PathLike, ratios: Ratios) -> str:
    """Writes ``ratios`` as JSON (with the kernel shapes it belongs to)."""
    path = os.fspath(path)
    doc = {"format": FORMAT, "version": VERSION,
           "created": datetime.datetime.now(datetime.UTC).isoformat(),
           **dataclasses.asdict(ratios)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    return path


def load_ratios(path: str | os.PathLike, params: Any, *, model: str | None = None
                ) -> Ratios:
    """Reads a :func:`save_ratios` file and checks it against ``params``: every kernel it
    names must exist here with the same shape (and ``model`` match, when both are
    given); one-line ValueError naming the file and the first mismatch otherwise."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--lora-ratios {path}: unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"--lora-ratios {path}: not a ratios file (format "
                         f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise ValueError(f"--lora-ratios {path}: version {doc.get('version')!r}, "
                         f"expected {VERSION}")
    if model is not None and doc.get("model") not in (None, model):
        raise ValueError(f"--lora-ratios {path} was made for model {doc['model']!r}, "
                         f"not {model!r}")
    shapes = kernel_shapes(params)
    ratios = doc.get("ratios") or {}
    kernels = doc.get("kernels") or {}
    for p, r in ratios.items():
        if p not in shapes:
            raise ValueError(f"--lora-ratios {path} was made for another model: it has "
                             f"kernel {p}, this model does not")
        if tuple(kernels.get(p, ())) != shapes[p]:
            raise ValueError(f"--lora-ratios {path} was made for another model: kernel "
                             f"{p} is {tuple(kernels.get(p, ()))} there, {shapes[p]} here")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
            raise ValueError(f"--lora-ratios {path}: ratio of {p} must be in [0, 1), "
                             f"got {r!r}")
    return Ratios(ratios={p: float(r) for p, r in ratios.items()},
                  kernels={p: list(v) for p, v in kernels.items()}, model=doc.get("model"),
                  settings=doc.get("settings") or {}, baseline=doc.get("baseline"),
                  curves=doc.get("curves") or {})
