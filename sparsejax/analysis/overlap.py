"""Overlap of two masks against the random baseline (Mukherjee et al., arXiv 2505.11711).

Mukherjee et al. ask whether RL runs from different seeds, data or algorithms update
the *same* subnetwork: with masks ``A`` and ``B`` of changed entries they report the
one-sided overlaps ``o1 = |A & B| / |A|`` and ``o2 = |A & B| / |B|`` and compare them
with what two independent uniform masks of the same sizes would give (``o1 = |B| / N``,
``o2 = |A| / N``). The Multiple Ticket Hypothesis (arXiv 2602.01599) uses the Jaccard
index the same way. The numbers come from :mod:`sparsejax.masks`
(:func:`~sparsejax.masks.jaccard`, :func:`~sparsejax.masks.overlap`,
:func:`~sparsejax.masks.random_baselines`); this module loads the files and resolves
``N``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sparsejax.analysis.checkpoints import AnalysisError
from sparsejax.masks import intersection_size, jaccard, load_mask, num_active, overlap, random_baselines


@dataclasses.dataclass
class OverlapReport:
    """Overlap statistics of two masks over ``total`` parameters."""

    mask1: str
    mask2: str
    total: int
    active1: int
    active2: int
    intersection: int
    jaccard: float
    o1: float
    o2: float
    baseline: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A small human-readable table."""
        b = self.baseline
        rows = [("jaccard", self.jaccard, b["jaccard"]), ("o1 = |A&B|/|A|", self.o1, b["o1"]),
                ("o2 = |A&B|/|B|", self.o2, b["o2"])]
        lines = [f"mask A: {self.mask1}: {self.active1:,} of {self.total:,} active "
                 f"({100 * self.active1 / self.total:.4f}%)",
                 f"mask B: {self.mask2}: {self.active2:,} of {self.total:,} active "
                 f"({100 * self.active2 / self.total:.4f}%)",
                 f"intersection: {self.intersection:,}", "",
                 f"{'metric':<16}{'observed':>12}{'random':>12}{'ratio':>10}",
                 "-" * 50]
        for name, obs, rnd in rows:
            ratio = f"{obs / rnd:.2f}x" if rnd else "-"
            lines.append(f"{name:<16}{obs:>12.6f}{rnd:>12.6f}{ratio:>10}")
        return "\n".join(lines)


def _load(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    if not os.path.isfile(path):
        raise AnalysisError(f"mask file not found: {path}")
    try:
        return load_mask(path)
    except AnalysisError:
        raise
    except Exception as e:  # safetensors' own error types, bad metadata
        raise AnalysisError(f"cannot read mask {path}: {e}") from None


def _meta_total(meta: dict[str, str], path: str) -> int | None:
    if "total" not in meta:
        return None
    try:
        return int(meta["total"])
    except ValueError:
        raise AnalysisError(f"{path}: metadata 'total' is not an integer: {meta['total']!r}"
                            ) from None


def mask_overlap(path1: str, path2: str, total: int | None = None) -> OverlapReport:
    """Jaccard, ``o1``/``o2`` and their random baselines for two saved masks.

    ``N`` (the number of parameters the masks index) comes from the files' ``total``
    metadata (written by :func:`~sparsejax.analysis.save_diff_mask`), else from
    ``total``. Raises :class:`AnalysisError` if neither gives it, if the sources
    disagree, or if the masks cover different tensors.
    """
    m1, meta1 = _load(path1)
    m2, meta2 = _load(path2)
    if set(m1) != set(m2):
        only1, only2 = sorted(set(m1) - set(m2)), sorted(set(m2) - set(m1))
        raise AnalysisError(f"masks cover different tensors: {len(only1)} only in {path1} "
                            f"{only1[:3]}, {len(only2)} only in {path2} {only2[:3]}")
    totals = {t for t in (_meta_total(meta1, path1), _meta_total(meta2, path2)) if t is not None}
    if len(totals) > 1:
        raise AnalysisError(f"the mask files disagree on 'total': {sorted(totals)}")
    if total is not None:
        if totals and total not in totals:
            raise AnalysisError(f"--total {total} disagrees with the files' 'total' "
                                f"metadata {totals.pop()}")
        totals = {int(total)}
    if not totals:
        raise AnalysisError("the total parameter count N is unknown: the mask files have no "
                            "'total' metadata; pass --total N")
    n = totals.pop()
    a1, a2 = num_active(m1), num_active(m2)
    if n <= 0 or n < max(a1, a2):
        raise AnalysisError(f"total {n} is smaller than a mask's active count ({max(a1, a2)})")
    inter = intersection_size(m1, m2)
    o1, o2 = overlap(m1, m2)
    return OverlapReport(path1, path2, n, a1, a2, inter, jaccard(m1, m2), o1, o2,
                         random_baselines(m1, m2, n))
