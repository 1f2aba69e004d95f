"""Masks: which entries of each parameter tensor are trained.

A **mask** is a pytree with the structure of the params. Each leaf is an ``int32``
array of the sorted, unique flat indices (into ``param.ravel()``) of the active
entries of that tensor, in one of two layouts:

* ``(k,)``: a flat list (any count per tensor);
* ``(rows, c)``: the *row-balanced* layout, where ``rows = prod(shape[:-1])`` and
  row ``r`` holds ``c`` indices in ``[r * cols, (r + 1) * cols)``. Every row has the
  same count, so the mask (and the compressed optimizer state) shards along the
  rows exactly like the weight, and an optimizer step stays shard-local.

A frozen tensor has an empty ``(0,)`` leaf. Dense boolean masks are an input and
output format only (:func:`from_dense`, :func:`to_dense`): an 8B model's bool mask
is 8 GB, its 1% index list 320 MB.

Constructors follow the papers' code: :func:`random_mask` (the Multiple Ticket
Hypothesis, arXiv 2602.01599), :func:`topk_mask` (BSR-AdamW's global top-k with
exact tie-breaking), :func:`diff_mask` (Mukherjee et al., arXiv 2505.11711).
All host-side work is NumPy and deterministic for a seed on any platform.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from sparsejax.config.names import MASK_STRATEGIES
from sparsejax.types import PyTree

Mask = Any  # a pytree of int32 index arrays, see the module docstring.

STRATEGIES = MASK_STRATEGIES
_MAX_NUMEL = 2**31 - 1  # int32 indices


# ----------------------------------------------------------------------------- paths


def path_str(path: Sequence[Any]) -> str:
    """A ``/``-joined name for a pytree key path, e.g. ``layers/0/attn/q_proj/kernel``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def leaves_with_paths(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(x))


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """The row-balanced view of a tensor: all leading axes are rows, the last is columns."""
    if not shape:
        return 1, 1
    return _numel(shape[:-1]), int(shape[-1])


def _check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float, np.floating)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def _selector(include: str | Iterable[str] | None,
              exclude: str | Iterable[str] | None) -> Callable[[str], bool]:
    """Path filter: ``re.search`` against any ``include`` pattern and no ``exclude`` one."""

    def compile_all(patterns):
        if patterns is None:
            return None
        if isinstance(patterns, str):
            patterns = [patterns]
        return [re.compile(p) for p in patterns]

    inc, exc = compile_all(include), compile_all(exclude)

    def selected(path: str) -> bool:
        if inc is not None and not any(p.search(path) for p in inc):
            return False
        return not (exc is not None and any(p.search(path) for p in exc))

    return selected


def _empty() -> np.ndarray:
    return np.zeros((0,), np.int32)


def unflatten(treedef: Any, leaves: list[np.ndarray]) -> Mask:
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ----------------------------------------------------------------------------- constructors


def _tensor_rng(seed: int, path: str) -> np.random.Generator:
    # A stable per-tensor stream: the same tensor gets the same draw whatever else the tree holds.
    return np.random.default_rng([int(seed), zlib.crc32(path.encode())])


def _sample_sorted(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` distinct integers from ``[0, n)``, uniformly without replacement, sorted."""
    if k == 0:
        return np.zeros((0,), np.int64)
    return np.sort(rng.choice(n, size=k, replace=False, shuffle=False))


def _row_balanced(rng: np.random.Generator, rows: int, cols: int, c: int) -> np.ndarray:
    """``c`` distinct columns per row, uniformly, as sorted flat indices, shape ``(rows, c)``."""
    out = np.empty((rows, c), np.int64)
    chunk = max(1, (1 << 22) // cols)  # ~4M random keys at a time bounds the memory
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        keys = rng.random((stop - start, cols), dtype=np.float32)
        cols_idx = np.sort(np.argpartition(keys, c - 1, axis=1)[:, :c], axis=1)
        out[start:stop] = cols_idx + np.arange(start, stop, dtype=np.int64)[:, None] * cols
    return out


def random_mask(params: PyTree, sparsity: float, *, seed: int = 0,
                strategy: str = "per_tensor",
                include: str | Iterable[str] | None = None,
                exclude: str | Iterable[str] | None = None) -> Mask:
    """A uniformly random mask keeping a ``1 - sparsity`` fraction of the selected entries.

    Strategies:
      * ``"per_tensor"``: ``floor((1 - sparsity) * numel)`` entries of every tensor,
        drawn without replacement (the Multiple Ticket Hypothesis sampling: every
        tensor, tied embeddings, norms and biases included; at 99.999% small tensors
        get none).
      * ``"global"``: exactly ``round((1 - sparsity) * N)`` entries over the ``N``
        selected entries of the whole tree.
      * ``"row_balanced"``: ``round((1 - sparsity) * cols)`` entries in every row of
        every tensor (the shard-friendly ``(rows, c)`` layout; rows are all leading
        axes, a vector is one row).

    Args:
      params: the parameter pytree (arrays or anything with a ``shape``).
      sparsity: the fraction of entries left frozen, in ``[0, 1)``.
      seed: the draw is a pure function of ``seed`` and each tensor's path.
      strategy: one of :data:`STRATEGIES`.
      include, exclude: regex patterns (``re.search``) on tensor paths such as
        ``layers/0/attn/q_proj/kernel``; tensors not selected are frozen.
    """
    _check_sparsity(sparsity)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    paths, leaves, treedef = leaves_with_paths(params)
    selected = _selector(include, exclude)
    shapes = [_shape(x) for x in leaves]
    for path, shape in zip(paths, shapes):
        if _numel(shape) > _MAX_NUMEL:
            raise ValueError(f"tensor {path} has {_numel(shape)} entries; int32 indices "
                             f"address at most {_MAX_NUMEL}")
    density = 1.0 - float(sparsity)
    out = []
    if strategy == "global":
        numels = np.array([_numel(s) if selected(p) else 0 for p, s in zip(paths, shapes)],
                          np.int64)
        total = int(numels.sum())
        k = int(round(density * total))
        flat = _sample_sorted(np.random.default_rng([int(seed), 0x61]), total, k)
        offsets = np.concatenate([[0], np.cumsum(numels)])
        bounds = np.searchsorted(flat, offsets)
        for i in range(len(leaves)):
            local = flat[bounds[i]:bounds[i + 1]] - offsets[i]
            out.append(local.astype(np.int32))
        return unflatten(treedef, out)
    for path, shape in zip(paths, shapes):
        if not selected(path):
            out.append(_empty())
            continue
        rng = _tensor_rng(seed, path)
        if strategy == "per_tensor":
            n = _numel(shape)
            out.append(_sample_sorted(rng, n, int(math.floor(density * n))).astype(np.int32))
        else:
            rows, cols = rows_cols(shape)
            c = int(round(density * cols))
            out.append(_empty() if c == 0 or rows == 0
                       else _row_balanced(rng, rows, cols, c).astype(np.int32))
    return unflatten(treedef, out)


def _order_keys(x: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order is the float32 order of ``x`` (-0.0 below +0.0)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def _topk_positions(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest keys; among equal keys the lowest positions win."""
    n = keys.size
    if k == 0:
        return np.zeros((0,), np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    threshold = np.partition(keys, n - k)[n - k]
    above = np.flatnonzero(keys > threshold)
    ties = np.flatnonzero(keys == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


def topk_mask(scores: PyTree, sparsity: float, *, scope: str = "global",
              min_keep_per_tensor: float = 0.0) -> Mask:
    """The mask of the exactly ``k`` highest-scoring entries.

    BSR-AdamW's Algorithm 1 (global threshold top-k) computed exactly: the ``k``-th
    largest score is found by selection, every entry above it is kept, and entries
    equal to it are kept in tree order (lower tensor position, then lower flat
    index) until exactly ``k`` are chosen. Deterministic for given scores.

    Args:
      scores: a pytree of float arrays (no NaN), e.g. from :mod:`sparsejax.analysis`.
      sparsity: fraction frozen, in ``[0, 1)``.
      scope: ``"global"``: ``k = round((1 - sparsity) * N)`` over the whole tree;
        ``"per_tensor"``: ``round((1 - sparsity) * numel)`` in every tensor.
      min_keep_per_tensor: with ``scope="global"``, every tensor first keeps its top
        ``ceil(min_keep_per_tensor * numel)`` entries; the rest of the budget ``k``
        then goes to the highest remaining scores anywhere.
    """
    _check_sparsity(sparsity)
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"unknown scope {scope!r}; expected 'global' or 'per_tensor'")
    if not 0.0 <= min_keep_per_tensor <= 1.0:
        raise ValueError(f"min_keep_per_tensor must be in [0, 1], got {min_keep_per_tensor}")
    paths, leaves, treedef = leaves_with_paths(scores)
    arrays = []
    for path, leaf in zip(paths, leaves):
        a = np.asarray(leaf, np.float32).reshape(-1)
        if np.isnan(a).any():
            raise ValueError(f"scores for {path} contain NaN")
        if a.size > _MAX_NUMEL:
            raise ValueError(f"tensor {path} is too large for int32 indices")
        arrays.append(a)
    density = 1.0 - float(sparsity)
    if scope == "per_tensor":
        out = [_topk_positions(_order_keys(a), int(round(density * a.size))).astype(np.int32)
               for a in arrays]
        return unflatten(treedef, out)

    sizes = np.array([a.size for a in arrays], np.int64)
    total = int(sizes.sum())
    k = int(round(density * total))
    reserved = [
        _topk_positions(_order_keys(a), min(a.size, math.ceil(min_keep_per_tensor * a.size)))
        for a in arrays]
    n_reserved = sum(r.size for r in reserved)
    if n_reserved > k:
        raise ValueError(f"min_keep_per_tensor={min_keep_per_tensor} reserves {n_reserved} "
                         f"entries, more than the budget k={k}")
    keys = np.concatenate([_order_keys(a) for a in arrays]) if arrays else np.zeros(0, np.uint32)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if n_reserved:
        # Reserved entries get the lowest key so they cannot be picked twice.
        taken = np.concatenate([r + offsets[i] for i, r in enumerate(reserved)])
        keys[taken] = 0
        chosen = _topk_positions(keys, k - n_reserved)
        chosen = np.sort(np.concatenate([chosen, taken]))
    else:
        chosen = _topk_positions(keys, k)
    bounds = np.searchsorted(chosen, offsets)
    out = [(chosen[bounds[i]:bounds[i + 1]] - offsets[i]).astype(np.int32)
           for i in range(len(arrays))]
    return unflatten(treedef, out)


def diff_mask(params_a: PyTree, params_b: PyTree, *, atol: float = 1e-5,
              dtype: Any = None) -> Mask:
    """Entries that changed between two checkpoints: ``|b - a| > atol``.

    Mukherjee et al. (arXiv 2505.11711) count a weight as unchanged iff
    ``|delta| <= 1e-5`` with both checkpoints in bf16; pass ``dtype=jnp.bfloat16``
    to round both to bf16 first. The difference is taken in float32.
    """
    paths_a, leaves_a, treedef_a = leaves_with_paths(params_a)
    paths_b, leaves_b, treedef_b = leaves_with_paths(params_b)
    if treedef_a != treedef_b:
        raise ValueError(f"param trees differ in structure:\n{treedef_a}\nvs\n{treedef_b}")
    out = []
    for path, a, b in zip(paths_a, leaves_a, leaves_b):
        if _shape(a) != _shape(b):
            raise ValueError(f"{path}: shapes differ, {_shape(a)} vs {_shape(b)}")
        a, b = np.asarray(a), np.asarray(b)
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        delta = np.abs(b.astype(np.float32) - a.astype(np.float32)).reshape(-1)
        out.append(np.flatnonzero(~(delta <= atol)).astype(np.int32))  # NaN counts as changed
    return unflatten(treedef_a, out)


# ----------------------------------------------------------------------------- conversion


def from_dense(dense: PyTree) -> Mask:
    """A flat-layout mask from a pytree of boolean arrays."""
    return jax.tree.map(
        lambda d: np.flatnonzero(np.asarray(d, bool).reshape(-1)).astype(np.int32), dense)


def to_dense(mask: Mask, params: PyTree) -> PyTree:
    """Boolean arrays shaped like ``params``, True at the active entries."""
    validate_mask(mask, params)

    def dense(idx, p):
        out = np.zeros(_numel(_shape(p)), bool)
        out[np.asarray(idx).reshape(-1)] = True
        return out.reshape(_shape(p))

    return jax.tree.map(dense, mask, params)


# ----------------------------------------------------------------------------- validation


def validate_mask(mask: Mask, params: PyTree) -> None:
    """Raises ``ValueError`` naming the tensor if ``mask`` is not a valid mask for ``params``.

    Checks: same tree structure; int32 leaves of rank 1 (flat) or 2 (row-balanced);
    indices strictly increasing (sorted, unique) and inside the tensor; row-balanced
    leaves have one row per tensor row and every index of row ``r`` in that row.
    """
    m_paths, m_leaves, m_def = leaves_with_paths(mask)
    p_paths, p_leaves, p_def = leaves_with_paths(params)
    if m_def != p_def:
        missing = sorted(set(p_paths) - set(m_paths))
        extra = sorted(set(m_paths) - set(p_paths))
        raise ValueError(
            "mask and params differ in structure"
            + (f"; tensors without a mask entry: {missing[:5]}" if missing else "")
            + (f"; mask entries without a tensor: {extra[:5]}" if extra else "")
            + ("" if missing or extra else f":\n{m_def}\nvs\n{p_def}"))
    for path, idx, p in zip(m_paths, m_leaves, p_leaves):
        shape = _shape(p)
        n = _numel(shape)
        dtype = getattr(idx, "dtype", None)
        if dtype != np.int32:
            raise ValueError(f"mask for {path}: indices must be int32, got {dtype}")
        if idx.ndim not in (1, 2):
            raise ValueError(f"mask for {path}: indices must have rank 1 (flat) or 2 "
                             f"(row-balanced), got shape {idx.shape}")
        flat = np.asarray(idx).reshape(-1).astype(np.int64)
        if flat.size == 0:
            continue
        if flat[0] < 0 or flat[-1] >= n or flat.min() < 0 or flat.max() >= n:
            raise ValueError(f"mask for {path}: index out of range for a tensor of shape "
                             f"{shape} ({n} entries): min {flat.min()}, max {flat.max()}")
        steps = np.diff(flat)
        if (steps == 0).any():
            raise ValueError(f"mask for {path}: duplicate index {flat[1:][steps == 0][0]}")
        if (steps < 0).any():
            raise ValueError(f"mask for {path}: indices are not sorted")
        if idx.ndim == 2:
            rows, cols = rows_cols(shape)
            if idx.shape[0] != rows:
                raise ValueError(f"mask for {path}: row-balanced layout needs {rows} rows "
                                 f"for shape {shape}, got {idx.shape[0]}")
            row_of = np.asarray(idx).astype(np.int64) // cols
            if (row_of != np.arange(rows)[:, None]).any():
                raise ValueError(f"mask for {path}: a row-balanced row holds an index "
                                 f"outside its row")


# ----------------------------------------------------------------------------- metrics


class Density(NamedTuple):
    per_tensor: dict[str, float]
    active: int
    total: int

    @property
    def density(self) -> float:
        return self.active / self.total if self.total else 0.0


def num_active(mask: Mask) -> int:
    """Total number of active entries."""
    return int(sum(np.size(x) for x in jax.tree.leaves(mask)))


def density(mask: Mask, params: PyTree) -> Density:
    """Per-tensor and total fraction of active entries."""
    validate_mask(mask, params)
    paths, idx, _ = leaves_with_paths(mask)
    numels = [_numel(_shape(p)) for p in jax.tree.leaves(params)]
    per = {path: (np.size(i) / n if n else 0.0) for path, i, n in zip(paths, idx, numels)}
    return Density(per, num_active(mask), int(sum(numels)))


def _pairs(a: Mask, b: Mask):
    pa, la, da = leaves_with_paths(a)
    _, lb, db = leaves_with_paths(b)
    if da != db:
        raise ValueError("masks differ in structure")
    return zip(pa, (np.asarray(x).reshape(-1) for x in la), (np.asarray(x).reshape(-1) for x in lb))


def intersection_size(a: Mask, b: Mask) -> int:
    """Number of entries active in both masks."""
    return int(sum(np.intersect1d(x, y, assume_unique=True).size for _, x, y in _pairs(a, b)))


def jaccard(a: Mask, b: Mask) -> float:
    """``|a & b| / |a | b|`` over the whole tree (1.0 for two empty masks)."""
    inter = intersection_size(a, b)
    union = num_active(a) + num_active(b) - inter
    return inter / union if union else 1.0


def overlap(a: Mask, b: Mask) -> tuple[float, float]:
    """One-sided overlaps ``(o1, o2) = (|a & b| / |a|, |a & b| / |b|)`` (Mukherjee et al.)."""
    inter = intersection_size(a, b)
    na, nb = num_active(a), num_active(b)
    return (inter / na if na else 0.0), (inter / nb if nb else 0.0)


def random_baselines(a: Mask, b: Mask, total: int) -> dict[str, float]:
    """What ``overlap`` and ``jaccard`` would be for independent uniform masks of the same sizes.

    With densities ``p = |a| / N`` and ``q = |b| / N``: ``o1 = q``, ``o2 = p`` and
    ``jaccard = pq / (p + q - pq)`` (``p / (2 - p)`` when ``p = q``).
    """
    p, q = num_active(a) / total, num_active(b) / total
    union = p + q - p * q
    return {"o1": q, "o2": p, "jaccard": p * q / union if union else 1.0}

