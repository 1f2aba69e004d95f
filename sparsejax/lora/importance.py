"""Importance of the entries of a pre-trained weight: SVD leverage scores or magnitude.

Partial-LoRA (arXiv 2512.22495) scores a pre-trained matrix ``W [m, n]`` through its
truncated SVD ``W ~ P_k S_k Q_k^T`` (``P_k [m, k]``, ``Q_k [n, k]``, orthonormal
columns):

    row leverage     l_i = ||P_k[i, :]||^2       (sums to k over the rows)
    column leverage  c_j = ||Q_k[j, :]||^2       (sums to k over the columns)

How strongly row ``i`` and column ``j`` take part in the top-``k`` subspace. An entry
``(i, j)`` scores ``l_i * c_j`` (``combine="product"``, the default) or ``l_i + c_j``
(``"sum"``). We take the product by default: it is the mass that the rank-``k``
projector ``P_k P_k^T (.) Q_k Q_k^T`` puts on entry ``(i, j)`` of a matrix of ones,
it is high only where both the row and the column matter, and it gives a strict
order inside a row or a column (the sum is the row/column coherence used for
sampling in matrix completion, which ranks an entry by its better coordinate).

``magnitude`` importance is ``|W_ij|`` (the comparison variant). Row and column
importances of a score matrix (used to pick the entries of the LoRA factors that
Targeted-LoRA keeps: ``A``'s rows are ``W``'s rows, ``B``'s columns ``W``'s columns)
are the leverages themselves, or the row/column sums of ``|W|``.

Kernels here are ``[in, out]`` (:mod:`sparsejax.models.decoder`), so rows are input
features; the scores do not depend on the layout (transposing ``W`` swaps P and Q).
"""

from __future__ import annotations

import numpy as np

IMPORTANCE = ("leverage", "magnitude")
COMBINE = ("product", "sum")


def _check_rank(w: np.ndarray, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) \
            or not 1 <= k <= min(w.shape):
        raise ValueError(f"svd rank must be an integer in [1, {min(w.shape)}] for a "
                         f"{w.shape} matrix, got {k!r}")


def leverage_scores(w, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(row leverage [m], column leverage [n])`` of the rank-``k`` truncated SVD of
    ``w [m, n]`` (float64 host SVD; each vector sums to ``k``)."""
    w = np.asarray(w, np.float64)
    if w.ndim != 2:
        raise ValueError(f"leverage scores need a matrix, got shape {w.shape}")
    _check_rank(w, k)
    p, _, qt = np.linalg.svd(w, full_matrices=False)
    return (p[:, :k] ** 2).sum(axis=1), (qt[:k] ** 2).sum(axis=0)


def row_col_importance(w, kind: str = "leverage", k: int = 8
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Importance of each row and each column of ``w`` (see the module docstring)."""
    if kind == "leverage":
        return leverage_scores(w, k)
    if kind == "magnitude":
        a = np.abs(np.asarray(w, np.float64))
        return a.sum(axis=1), a.sum(axis=0)
    raise ValueError(f"importance must be one of {IMPORTANCE}, got {kind!r}")


def entry_importance(w, kind: str = "leverage", k: int = 8,
                     combine: str = "product") -> np.ndarray:
    """``[m, n]`` float64 importance of every entry of ``w``."""
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    if kind == "magnitude":
        return np.abs(np.asarray(w, np.float64))
    rows, cols = row_col_importance(w, kind, k)
    return np.outer(rows, cols) if combine == "product" else rows[:, None] + cols[None, :]
