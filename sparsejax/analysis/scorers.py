"""Streaming importance scores from early weight deltas (BSR-AdamW style).

BSR-AdamW ("Winning at the RL Casino") predicts which weights RL finetuning will
move from the first few steps of a dense run: it scores every entry from the early
trajectory ``w_0, w_1, ..., w_T`` and keeps the global top-k
(:func:`sparsejax.masks.topk_mask`). The scorers here compute such scores over a
sequence of checkpoints fed one at a time, in O(N) memory: each keeps a fixed
number of float32 accumulators of the params' size, never the sequence.

Every scorer has the same API::

    scorer = MomentumScorer(beta=0.9)
    for params in checkpoints:          # pytrees of arrays, or HF checkpoint folders
        scorer.update(params)
    mask = sparsejax.topk_mask(scorer.scores(), sparsity=0.99)

``update`` accepts a pytree of arrays (NumPy or JAX) or the path of a Hugging Face
safetensors folder; a folder is read one tensor at a time and scored as the dict
``{HF tensor name: array}``, so ``scores()`` then returns such a dict.

Scores (``d_t = w_t - w_{t-1}`` are the successive deltas, ``t = 1..T``):

* :class:`MagnitudeScorer`: ``|w_T - w_0|``, the total displacement (2 accumulators).
* :class:`MomentumScorer`: ``|m_T|`` with the bias-corrected exponential moving
  average ``m_t = beta m_{t-1} + (1 - beta) d_t``, ``m_T / (1 - beta^T)`` (2).
  Recent, consistently signed movement scores high; oscillation cancels.
* :class:`VarianceScorer`: Welford's running mean ``mu`` and population variance
  ``var`` of the deltas (3 accumulators). Its default score is the squared
  signal-to-noise ratio ``mu^2 / (var + eps)``. We chose this combination because it
  separates the two things a delta can be: drift (a consistent direction, large
  ``|mu|`` relative to the spread) versus noise (zero-mean jitter, ``mu^2`` of order
  ``var / T``). Raw variance would rank noisy entries *highest*, the opposite of
  what a mask predictor wants. The SNR is scale-free, so ``score="snr_weighted"``
  (``mu^2 / (var + eps) * |mu|``) is offered to favour large moves among equally
  consistent ones; ``score="variance"`` and ``score="mean"`` (``|mu|``) expose the
  raw statistics.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from sparsejax.analysis.checkpoints import AnalysisError, CheckpointReader
from sparsejax.types import PyTree


def _is_folder(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


class StreamingScorer(abc.ABC):
    """Base class: per-tensor accumulators updated one checkpoint at a time.

    Guarantees: every checkpoint must have the structure (or the tensor names) and
    shapes of the first; memory is ``n_accumulators * N`` float32 entries plus one
    tensor of the checkpoint being read. ``scores()`` returns float32 arrays shaped
    like the params in the first checkpoint's structure, with no NaN, ready for
    :func:`sparsejax.masks.topk_mask`.
    """

    def __init__(self) -> None:
        self.num_checkpoints = 0
        self._treedef: Any = None
        self._names: list[str] | None = None
        self._shapes: list[tuple[int, ...]] = []
        self._state: list[dict[str, np.ndarray]] = []

    @property
    def num_deltas(self) -> int:
        """Number of successive deltas seen (checkpoints - 1)."""
        return max(0, self.num_checkpoints - 1)

    # -- input ---------------------------------------------------------------

    def _leaves(self, params: PyTree | str | os.PathLike[str],
                names: Iterable[str] | None = None) -> Iterable[tuple[int, np.ndarray]]:
        """``(leaf index, float32 array)`` pairs, streamed from a folder or a pytree."""
        if _is_folder(params):
            reader = CheckpointReader(params)
            if names is None:
                names = reader.names()
            else:
                names = sorted(names)
                missing = sorted(set(names) - set(reader.names()))
                if missing:
                    reader.close()
                    raise AnalysisError(f"{os.fspath(params)}: no tensor {missing[0]}"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                           else ""))
            if self._names is None and self._treedef is None:
                self._names = names
                self._shapes = [reader.shape(n) for n in names]
            elif self._names != names:
                reader.close()
                raise AnalysisError(f"{os.fspath(params)}: tensor names differ from the first "
                                    f"checkpoint of the trajectory")
            return _folder_leaves(reader, names)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        if self._treedef is None and self._names is None:
            self._treedef = treedef
            self._shapes = [tuple(np.shape(x)) for x in leaves]
        elif treedef != self._treedef:
            raise AnalysisError("params structure differs from the first checkpoint")
        return ((i, np.asarray(x, np.float32)) for i, x in enumerate(leaves))

    def update(self, params: PyTree | str | os.PathLike[str], *,
               names: Iterable[str] | None = None) -> None:
        """Feeds the next checkpoint of the trajectory (a pytree or a folder path).

        ``names`` (a folder only): read just these tensors, not every tensor of the folder
        (e.g. only those a model has: a tied ``lm_head.weight`` or a ``rotary_emb`` buffer
        one folder has and another lacks is then not compared); the same every call.
        """
        if names is not None and not _is_folder(params):
            raise ValueError("names applies to checkpoint folders only")
        first = self.num_checkpoints == 0
        for i, x in self._leaves(params, names):
            if x.shape != self._shapes[i]:
                raise AnalysisError(f"tensor {self._leaf_name(i)}: shape {x.shape} differs "
                                    f"from {self._shapes[i]} in the first checkpoint")
            if first:
                self._state.append(self._init_leaf(x))
            else:
                self._update_leaf(self._state[i], x)
        self.num_checkpoints += 1

    def _leaf_name(self, i: int) -> str:
        return self._names[i] if self._names is not None else f"leaf {i}"

    # -- output --------------------------------------------------------------

    def scores(self) -> PyTree:
        """The score of every entry, in the structure of the first checkpoint."""
        if self.num_checkpoints < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 checkpoints, "
                             f"got {self.num_checkpoints}")
        leaves = [np.nan_to_num(self._score_leaf(s).astype(np.float32), nan=0.0)
                  for s in self._state]
        if self._names is not None:
            return dict(zip(self._names, leaves))
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    # -- per-leaf math -------------------------------------------------------

    @abc.abstractmethod
    def _init_leaf(self, w0: np.ndarray) -> dict[str, np.ndarray]:
        """Accumulators for one tensor from its first value."""

    @abc.abstractmethod
    def _update_leaf(self, state: dict[str, np.ndarray], w: np.ndarray) -> None:
        """Folds the next value of one tensor into its accumulators, in place."""

    @abc.abstractmethod
    def _score_leaf(self, state: dict[str, np.ndarray]) -> np.ndarray:
        """The score of one tensor from its accumulators."""


def _folder_leaves(reader: CheckpointReader, names: list[str]):
    with reader:
        for i, name in enumerate(names):
            yield i, np.asarray(reader.get(name), np.float32)


class MagnitudeScorer(StreamingScorer):
    """``|w_T - w_0|``: how far each entry moved over the window (2 accumulators)."""

    def _init_leaf(self, w0: np.ndarray) -> dict[str, np.ndarray]:
        return {"w0": w0.copy(), "last": w0.copy()}

    def _update_leaf(self, state: dict[str, np.ndarray], w: np.ndarray) -> None:
        state["last"][...] = w

    def _score_leaf(self, state: dict[str, np.ndarray]) -> np.ndarray:
        return np.abs(state["last"] - state["w0"])


class MomentumScorer(StreamingScorer):
    """``|EMA of successive deltas|`` at the end of the window, bias-corrected.

    ``m_t = beta * m_{t-1} + (1 - beta) * d_t`` with ``m_0 = 0``; the score is
    ``|m_T| / (1 - beta^T)``, a weighted mean of the deltas in delta units (the
    correction does not change the ranking). Give either ``beta`` or ``window``:
    ``window=W`` means ``beta = 1 - 2 / (W + 1)`` (the usual EMA span, so the mean age
    of the weighted deltas is about ``(W - 1) / 2`` steps). ``beta=0`` scores only the
    last delta.
    """

    def __init__(self, beta: float | None = None, *, window: float | None = None):
        super().__init__()
        if beta is not None and window is not None:
            raise ValueError("give beta or window, not both")
        if window is not None:
            if window < 1:
                raise ValueError(f"window must be >= 1, got {window}")
            beta = 1.0 - 2.0 / (float(window) + 1.0)
        self.beta = 0.9 if beta is None else float(beta)
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")

    def _init_leaf(self, w0: np.ndarray) -> dict[str, np.ndarray]:
        return {"prev": w0.copy(), "m": np.zeros_like(w0)}

    def _update_leaf(self, state: dict[str, np.ndarray], w: np.ndarray) -> None:
        d = w - state["prev"]
        state["m"] *= self.beta
        state["m"] += (1.0 - self.beta) * d
        state["prev"][...] = w

    def _score_leaf(self, state: dict[str, np.ndarray]) -> np.ndarray:
        correction = 1.0 - self.beta ** self.num_deltas
        return np.abs(state["m"]) / np.float32(correction)


VARIANCE_SCORES = ("snr", "snr_weighted", "variance", "mean")


class VarianceScorer(StreamingScorer):
    """Welford running mean and variance of successive deltas (3 accumulators).

    After ``T`` deltas, :meth:`mean` equals ``np.mean(deltas, axis=0)`` and
    :meth:`variance` equals ``np.var(deltas, axis=0)`` (population variance,
    ``ddof=0``) up to float32 rounding, without storing the deltas. The score is
    chosen by ``score`` (see the module docstring for why ``"snr"`` is the default):

    * ``"snr"``: ``mu^2 / (var + eps)``: consistent drift high, zero-mean noise low;
    * ``"snr_weighted"``: ``mu^2 / (var + eps) * |mu|``;
    * ``"variance"``: ``var``; ``"mean"``: ``|mu|``.

    ``eps`` keeps never-moving entries (``mu = var = 0``) at score 0 and bounds the
    score of perfectly constant drift.
    """

    def __init__(self, score: str = "snr", eps: float = 1e-20):
        super().__init__()
        if score not in VARIANCE_SCORES:
            raise ValueError(f"unknown score {score!r}; expected one of {VARIANCE_SCORES}")
        self.score = score
        self.eps = float(eps)

    def _init_leaf(self, w0: np.ndarray) -> dict[str, np.ndarray]:
        return {"prev": w0.copy(), "mean": np.zeros_like(w0), "m2": np.zeros_like(w0)}

    def _update_leaf(self, state: dict[str, np.ndarray], w: np.ndarray) -> None:
        n = self.num_checkpoints  # this delta's count (checkpoints seen before this one)
        d = w - state["prev"]
        diff = d - state["mean"]
        state["mean"] += diff / np.float32(n)
        state["m2"] += diff * (d - state["mean"])
        state["prev"][...] = w

    def _stat(self, which: str) -> PyTree:
        if self.num_deltas < 1:
            raise ValueError("VarianceScorer needs at least 2 checkpoints")
        if which == "mean":
            leaves = [s["mean"].copy() for s in self._state]
        else:
            leaves = [s["m2"] / np.float32(self.num_deltas) for s in self._state]
        if self._names is not None:
            return dict(zip(self._names, leaves))
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def mean(self) -> PyTree:
        """Running mean of the successive deltas."""
        return self._stat("mean")

    def variance(self) -> PyTree:
        """Running population variance (``ddof=0``) of the successive deltas."""
        return self._stat("variance")

    def _score_leaf(self, state: dict[str, np.ndarray]) -> np.ndarray:
        mu = state["mean"]
        var = state["m2"] / np.float32(self.num_deltas)
        if self.score == "variance":
            return var
        if self.score == "mean":
            return np.abs(mu)
        # float64 for the ratio: mu^2 and eps underflow float32 for tiny deltas.
        snr = np.square(mu, dtype=np.float64) / (var.astype(np.float64) + self.eps)
        if self.score == "snr_weighted":
            snr *= np.abs(mu)
        return np.minimum(snr, np.finfo(np.float32).max)


SCORERS: dict[str, type[StreamingScorer]] = {
    "magnitude": MagnitudeScorer,
    "momentum": MomentumScorer,
    "variance": VarianceScorer,
}


def make_scorer(kind: str, **kwargs: Any) -> StreamingScorer:
    """A scorer by name: ``"magnitude"``, ``"momentum"`` or ``"variance"``."""
    if kind not in SCORERS:
        raise ValueError(f"unknown scorer {kind!r}; expected one of {sorted(SCORERS)}")
    return SCORERS[kind](**kwargs)


def score_trajectory(checkpoints: Iterable[PyTree | str | os.PathLike[str]], kind: str = "momentum",
                     **kwargs: Any) -> PyTree:
    """Scores a whole trajectory (consumed lazily, one checkpoint at a time)."""
    scorer = make_scorer(kind, **kwargs)
    for params in checkpoints:
        scorer.update(params)
    return scorer.scores()
