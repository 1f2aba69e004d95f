"""Update sparsity and update rank between two checkpoints.

Mukherjee et al., "Reinforcement Learning Finetunes Small Subnetworks in Large
Language Models" (arXiv 2505.11711), measure how much of a model RL finetuning
touches: a weight is **unchanged** iff ``|w_B - w_A| <= atol`` (``atol = 1e-5``)
after both checkpoints are rounded to bf16, and the **update sparsity** is the
fraction of unchanged weights over all parameters. They break it down per layer and
per matrix type, measure the numerical **rank** of each 2-D update, and finetune the
subnetwork given by the changed entries.

:func:`diff_checkpoints` reproduces these numbers straight from two Hugging Face
safetensors folders, one tensor pair (or one block of rows of a pair) at a time, so
memory is bounded by the largest tensors, never by the model. The changed-entry test
itself is :func:`sparsejax.masks.diff_mask`, so the exported mask and the reported
counts agree by construction.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

from sparsejax.analysis.checkpoints import AnalysisError, CheckpointReader
from sparsejax.masks import diff_mask, save_mask

DTYPES: dict[str, Any] = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
_FLOAT_TAGS = ("F16", "BF16", "F32", "F64")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


# ----------------------------------------------------------------------------- rank


def update_rank(delta: Any, rtol: float | None = None) -> int:
    """Numerical rank of a 2-D update ``delta``, computed by an SVD in float32.

    The rank is the number of singular values ``s_i > rtol * s_max``. With
    ``rtol=None`` the tolerance is ``max(m, n) * eps(float32)``, the convention of
    ``numpy.linalg.matrix_rank`` for float32 data. An all-zero update has rank 0.
    Mukherjee et al. report ranks as a fraction of ``min(m, n)`` (see
    :func:`update_rank_fraction`).
    """
    d = np.asarray(delta, np.float32)
    if d.ndim != 2:
        raise ValueError(f"update_rank needs a 2-D matrix, got shape {d.shape}")
    if d.size == 0:
        return 0
    if not np.isfinite(d).all():
        raise ValueError("update_rank: the update contains NaN or inf")
    s = np.linalg.svd(d, compute_uv=False)
    if s[0] == 0:
        return 0
    tol = (max(d.shape) * np.finfo(np.float32).eps) if rtol is None else float(rtol)
    return int(np.count_nonzero(s > tol * s[0]))


def update_rank_fraction(delta: Any, rtol: float | None = None) -> float:
    """:func:`update_rank` divided by the full rank ``min(m, n)``."""
    d = np.asarray(delta)
    full = min(d.shape) if d.ndim == 2 else 0
    return update_rank(d, rtol) / full if full else 0.0


# ----------------------------------------------------------------------------- names


def layer_group(name: str) -> str:
    """The per-layer table row a Hugging Face tensor name belongs to.

    ``model.layers.12.mlp.up_proj.weight`` -> ``"layers.12"``; embeddings ->
    ``"embeddings"``; the final norm -> ``"final_norm"``; ``lm_head.*`` ->
    ``"lm_head"``; anything else -> ``"other"``.
    """
    m = _LAYER.search(name)
    if m:
        return f"layers.{int(m.group(1))}"
    if "embed" in name or re.search(r"(?:^|\.)wte\.", name):
        return "embeddings"
    if name.startswith("lm_head") or ".lm_head." in name:
        return "lm_head"
    if "norm" in name:
        return "final_norm"
    return "other"


def _group_order(group: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"layers\.(\d+)", group)
    if m:
        return (1, int(m.group(1)), group)
    rank = {"embeddings": 0, "final_norm": 2, "lm_head": 3}.get(group, 4)
    return (rank, 0, group)


def matrix_type(name: str) -> str:
    """The per-matrix-type table row: the module name, ``.bias`` kept apart.

    ``model.layers.3.self_attn.q_proj.weight`` -> ``"q_proj"``;
    ``...q_proj.bias`` -> ``"q_proj.bias"``; ``model.embed_tokens.weight`` ->
    ``"embed_tokens"``; ``model.norm.weight`` -> ``"norm"``.
    """
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight":
        return parts[-2]
    if len(parts) >= 2 and parts[-1] == "bias":
        return f"{parts[-2]}.bias"
    return ".".join(parts[-2:])


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass
class TensorDiff:
    """Counts for one tensor: ``unchanged`` of ``numel`` entries (and the update rank)."""

    name: str
    shape: tuple[int, ...]
    numel: int
    unchanged: int
    rank: int | None = None

    @property
    def changed(self) -> int:
        return self.numel - self.unchanged

    @property
    def sparsity(self) -> float:
        return self.unchanged / self.numel if self.numel else 1.0

    @property
    def rank_fraction(self) -> float | None:
        if self.rank is None or len(self.shape) != 2 or min(self.shape) == 0:
            return None
        return self.rank / min(self.shape)


@dataclasses.dataclass
class GroupDiff:
    """Counts summed over a group of tensors (a layer, or a matrix type)."""

    name: str
    tensors: int
    numel: int
    unchanged: int
    mean_rank_fraction: float | None

    @property
    def sparsity(self) -> float:
        return self.unchanged / self.numel if self.numel else 1.0


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


@dataclasses.dataclass
class DiffReport:
    """Update sparsity of ``b`` relative to ``a`` (Mukherjee et al., arXiv 2505.11711).

    ``tensors`` holds exact integer counts per tensor; the per-layer and per-type
    tables and the totals are sums of those counts, so every fraction reported is an
    exact ratio of integers. ``mask`` (when requested) maps each tensor name to the
    sorted int32 flat indices of its changed entries.
    """

    a: str
    b: str
    atol: float
    dtype: str
    rank_rtol: float | None
    tensors: list[TensorDiff]
    mask: dict[str, np.ndarray] | None = None

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def unchanged(self) -> int:
        return sum(t.unchanged for t in self.tensors)

    @property
    def sparsity(self) -> float:
        """Fraction of all parameters that did not change."""
        return self.unchanged / self.numel if self.numel else 1.0

    @property
    def mean_rank_fraction(self) -> float | None:
        """Mean over 2-D tensors of rank / full rank (``None`` without ``rank=True``)."""
        return _mean([t.rank_fraction for t in self.tensors if t.rank_fraction is not None])

    def grouped(self, key: Callable[[str], str]) -> list[GroupDiff]:
        """Tensors summed by ``key(name)``."""
        groups: dict[str, list[TensorDiff]] = {}
        for t in self.tensors:
            groups.setdefault(key(t.name), []).append(t)
        return [GroupDiff(g, len(ts), sum(t.numel for t in ts), sum(t.unchanged for t in ts),
                          _mean([t.rank_fraction for t in ts if t.rank_fraction is not None]))
                for g, ts in groups.items()]

    def by_layer(self) -> list[GroupDiff]:
        """Per-layer table: embeddings, ``layers.0`` .. ``layers.L-1``, final norm, lm_head."""
        return sorted(self.grouped(layer_group), key=lambda g: _group_order(g.name))

    def by_type(self) -> list[GroupDiff]:
        """Per-matrix-type table (q_proj, k_proj, ..., input_layernorm, ...), by name."""
        return sorted(self.grouped(matrix_type), key=lambda g: g.name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary with exact counts."""

        def group(g: GroupDiff) -> dict[str, Any]:
            return {"name": g.name, "tensors": g.tensors, "params": g.numel,
                    "unchanged": g.unchanged, "changed": g.numel - g.unchanged,
                    "sparsity": g.sparsity, "mean_rank_fraction": g.mean_rank_fraction}

        return {
            "a": self.a, "b": self.b, "atol": self.atol, "dtype": self.dtype,
            "rank_rtol": self.rank_rtol,
            "total": {"params": self.numel, "unchanged": self.unchanged,
                      "changed": self.numel - self.unchanged, "sparsity": self.sparsity,
                      "mean_rank_fraction": self.mean_rank_fraction},
            "by_layer": [group(g) for g in self.by_layer()],
            "by_type": [group(g) for g in self.by_type()],
            "tensors": [{"name": t.name, "shape": list(t.shape), "params": t.numel,
                         "unchanged": t.unchanged, "changed": t.changed,
                         "sparsity": t.sparsity, "rank": t.rank,
                         "rank_fraction": t.rank_fraction} for t in self.tensors],
        }

    def format(self, per_tensor: bool = False) -> str:
        """Human-readable tables (per layer, per matrix type, optionally per tensor)."""
        with_rank = any(t.rank is not None for t in self.tensors)
        lines = [
            f"update sparsity: {self.a} -> {self.b}",
            f"  rule: unchanged iff |delta| <= {self.atol:g} after rounding to {self.dtype}",
            f"  total: {self.unchanged:,} of {self.numel:,} parameters unchanged "
            f"= {100 * self.sparsity:.4f}% update sparsity "
            f"({self.numel - self.unchanged:,} changed)",
        ]
        if with_rank:
            mr = self.mean_rank_fraction
            lines.append("  update rank: " + ("n/a (no 2-D tensors)" if mr is None else
                                              f"{100 * mr:.2f}% of full rank "
                                              f"(mean over 2-D tensors)"))
        rows_layer = [(g.name, g.tensors, g.numel, g.numel - g.unchanged, g.sparsity,
                       g.mean_rank_fraction) for g in self.by_layer()]
        rows_type = [(g.name, g.tensors, g.numel, g.numel - g.unchanged, g.sparsity,
                      g.mean_rank_fraction) for g in self.by_type()]
        lines += ["", _table("layer", rows_layer, with_rank), "",
                  _table("matrix type", rows_type, with_rank)]
        if per_tensor:
            rows = [(t.name, 1, t.numel, t.changed, t.sparsity, t.rank_fraction)
                    for t in self.tensors]
            lines += ["", _table("tensor", rows, with_rank)]
        return "\n".join(lines)


def _table(title: str, rows: list[tuple], with_rank: bool) -> str:
    head = [title, "tensors", "params", "changed", "sparsity"] + (["rank"] if with_rank else [])
    body = []
    for name, n, numel, changed, sparsity, rank in rows:
        row = [name, str(n), f"{numel:,}", f"{changed:,}", f"{100 * sparsity:.4f}%"]
        if with_rank:
            row.append("-" if rank is None else f"{100 * rank:.2f}%")
        body.append(row)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


# ----------------------------------------------------------------------------- diff


def _check_pair(ra: CheckpointReader, rb: CheckpointReader) -> list[str]:
    names_a, names_b = set(ra.names()), set(rb.names())
    only_a, only_b = sorted(names_a - names_b), sorted(names_b - names_a)
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in {ra.folder} (e.g. {', '.join(only_a[:3])})")
        if only_b:
            parts.append(f"{len(only_b)} only in {rb.folder} (e.g. {', '.join(only_b[:3])})")
        raise AnalysisError("checkpoints hold different tensors: " + "; ".join(parts))
    names = sorted(names_a)
    for name in names:
        if ra.shape(name) != rb.shape(name):
            raise AnalysisError(f"shape mismatch for {name}: {ra.shape(name)} in {ra.folder} "
                                f"vs {rb.shape(name)} in {rb.folder}")
    return names


def _changed(a: np.ndarray, b: np.ndarray, atol: float, dtype: Any, is_float: bool
             ) -> np.ndarray:
    """Sorted flat indices (int32) of the changed entries of one block."""
    if not is_float:  # integer / bool buffers: exact comparison
        return np.flatnonzero(np.asarray(a).reshape(-1) != np.asarray(b).reshape(-1)
                              ).astype(np.int32)
    return diff_mask({"t": a}, {"t": b}, atol=atol, dtype=dtype)["t"]


def diff_checkpoints(a: str | os.PathLike[str], b: str | os.PathLike[str], *,
                     atol: float = 1e-5, dtype: str = "bfloat16", rank: bool = False,
                     rank_rtol: float | None = None, collect_mask: bool = False,
                     progress: bool = False, max_chunk_elements: int = 1 << 24,
                     include: Callable[[str], bool] | None = None) -> DiffReport:
    """Compares two Hugging Face checkpoint folders tensor by tensor.

    Args:
      a, b: folders with ``model.safetensors`` or sharded ``model-*.safetensors`` plus
        ``model.safetensors.index.json``; ``b`` is the finetuned one.
      atol: an entry is unchanged iff ``|b - a| <= atol`` (difference in float32).
      dtype: ``"bfloat16"`` (Mukherjee et al.: both rounded to bf16 first) or
        ``"float32"``.
      rank: also compute :func:`update_rank` of every 2-D delta (loads each 2-D
        tensor pair whole; an SVD per matrix).
      rank_rtol: relative singular-value tolerance for the rank (see
        :func:`update_rank`).
      collect_mask: keep the changed indices of every tensor in ``report.mask``.
      progress: show a tqdm bar over tensors on stderr.
      max_chunk_elements: without ``rank``, tensors are compared in blocks of whole
        rows of at most this many entries, bounding the working memory.
      include: optional predicate on tensor names; others are skipped.

    Raises:
      AnalysisError: missing folder or files, tensors present in only one
        checkpoint, or shape mismatches (all checked before any data is read).
    """
    if dtype not in DTYPES:
        raise AnalysisError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if not (atol >= 0 and math.isfinite(atol)):
        raise AnalysisError(f"atol must be a finite number >= 0, got {atol}")
    np_dtype = DTYPES[dtype]
    results: list[TensorDiff] = []
    mask: dict[str, np.ndarray] | None = {} if collect_mask else None
    with CheckpointReader(a) as ra, CheckpointReader(b) as rb:
        names = _check_pair(ra, rb)
        if include is not None:
            names = [n for n in names if include(n)]
        bar = _progress(names, progress)
        try:
            for name in bar:
                shape, numel = ra.shape(name), ra.numel(name)
                is_float = ra.dtype(name) in _FLOAT_TAGS and rb.dtype(name) in _FLOAT_TAGS
                r = None
                if rank and len(shape) == 2 and is_float:
                    xa = np.asarray(ra.get(name)).astype(np_dtype).astype(np.float32)
                    xb = np.asarray(rb.get(name)).astype(np_dtype).astype(np.float32)
                    changed = _changed(xa, xb, atol, None, True)
                    delta = xb - xa
                    del xa, xb
                    r = update_rank(delta, rank_rtol)
                    del delta
                else:
                    pieces = []
                    for (offset, ca), (_, cb) in zip(ra.row_chunks(name, max_chunk_elements),
                                                     rb.row_chunks(name, max_chunk_elements)):
                        idx = _changed(ca, cb, atol, np_dtype, is_float)
                        pieces.append(idx.astype(np.int64) + offset if offset else idx)
                    changed = (np.concatenate(pieces) if len(pieces) > 1 else
                               pieces[0] if pieces else np.zeros(0, np.int32)).astype(np.int32)
                results.append(TensorDiff(name, shape, numel, numel - int(changed.size), r))
                if mask is not None:
                    mask[name] = changed
        finally:
            if hasattr(bar, "close"):
                bar.close()
    return DiffReport(os.fspath(a), os.fspath(b), float(atol), dtype, rank_rtol, results, mask)


def _progress(names: list[str], enabled: bool) -> Iterable[str]:
    if not enabled:
        return names
    from tqdm.auto import tqdm
    return tqdm(names, desc="tensors", unit="tensor", leave=False)


def save_diff_mask(path: str, report: DiffReport) -> None:
    """Writes ``report.mask`` with :func:`sparsejax.masks.save_mask`, keyed by HF names.

    The file's metadata records ``total`` (the number of parameters the mask indexes,
    needed for the random baselines of :func:`sparsejax.masks.random_baselines`),
    the two checkpoints, ``atol`` and ``dtype``.
    """
    if report.mask is None:
        raise ValueError("the report holds no mask; run diff_checkpoints(collect_mask=True)")
    save_mask(path, report.mask, metadata={
        "total": str(report.numel), "source": "diff", "a": report.a, "b": report.b,
        "atol": repr(report.atol), "dtype": report.dtype})
