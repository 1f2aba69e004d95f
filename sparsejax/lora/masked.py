"""Masked LoRA: only some entries of the factors train (Partial-LoRA, arXiv 2512.22495).

A mask here is an ordinary :mod:`sparsejax.masks` mask over the adapter pytree
(``{kernel path: Factors(a, b)}``; leaf paths such as ``layers/0/attn/q_proj/kernel/a``),
so every mask constructor works on it and the fused sparse AdamW of
:mod:`sparsejax.optim` steps it with state of size ``k`` (the trainable entries).

Semantics: the adapter is ``(A * M_A) @ (B * M_B)``: :func:`apply_mask` sets the
entries off the mask to zero once (``B`` is zero anyway at PEFT's init), and the
sparse step never writes them, so they stay zero and a saved PEFT adapter is the
dense factors with those zeros.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib
from sparsejax.lora.adapters import Adapters, Factors

Mask = Any


def _check_density(path: str, d: Any) -> float:
    if isinstance(d, bool) or not isinstance(d, (int, float, np.floating)) \
            or not (0.0 < float(d) <= 1.0) or math.isnan(float(d)):
        raise ValueError(f"--lora-density for {path} must be in (0, 1], got {d!r}")
    return float(d)


def factor_masks(adapters: Adapters, density: float | Mapping[str, float], *,
                 seed: int = 0, strategy: str = "per_tensor") -> Mask:
    """Random masks on the factors at a density per kernel (both factors of a kernel
    share its density): a float for all, or ``{kernel path: density}`` covering every
    adapted kernel. Each factor keeps ``floor(density * numel)`` entries (per_tensor;
    see :func:`sparsejax.masks.random_mask` for the other strategies), drawn as a pure
    function of ``seed`` and the factor's path; a factor left with no entry is refused.
    """
    if isinstance(density, Mapping):
        missing = [p for p in adapters if p not in density]
        if missing:
            raise ValueError(f"no density for adapted kernel {missing[0]}")
        per = {p: _check_density(p, density[p]) for p in adapters}
    else:
        per = {p: _check_density("every kernel", density) for p in adapters}
    groups: dict[float, list[str]] = {}
    for p, d in per.items():
        groups.setdefault(d, []).append(p)
    leaves = {}
    for d, paths in groups.items():
        include = [re.escape(p) + r"/[ab]\Z" for p in paths]
        # random_mask keeps floor((1 - sparsity) * n): nudge so that a density such as
        # 1 - 0.8 (0.19999999999999996 in floats) keeps 0.2 * n, not one entry less.
        m = masks_lib.random_mask(adapters, max(0.0, 1.0 - d - 1e-12), seed=seed,
                                  strategy=strategy, include=include)
        for p in paths:
            leaves[p] = m[p]
    out = {p: leaves[p] for p in adapters}
    for p, f in out.items():
        for name, idx in zip("ab", f):
            if np.size(idx) == 0:
                raise ValueError(f"--lora-density {per[p]} leaves no trainable entry in "
                                 f"factor {name.upper()} of {p} "
                                 f"{np.shape(getattr(adapters[p], name))}")
    return out


def full_masks(adapters: Adapters) -> Mask:
    """The mask of every factor entry (dense LoRA through the sparse step)."""
    return {p: Factors(*(np.arange(np.size(x), dtype=np.int32) for x in f))
            for p, f in adapters.items()}


def apply_mask(adapters: Adapters, mask: Mask) -> Adapters:
    """``adapters`` with every entry off ``mask`` set to zero (the masked adapter)."""
    masks_lib.validate_mask(mask, adapters)

    def one(x, idx):  # on the host: the factors are small, and no compile per shape
        x = np.asarray(jax.device_get(x))
        out = np.zeros_like(x).reshape(-1)
        flat = np.asarray(idx).reshape(-1)
        out[flat] = x.reshape(-1)[flat]
        return jnp.asarray(out.reshape(x.shape))
    return jax.tree.map(one, adapters, mask)


def densities(mask: Mask, adapters: Adapters) -> dict[str, float]:
    """Trainable fraction of each kernel's factors."""
    return {p: (np.size(mask[p].a) + np.size(mask[p].b))
            / (np.size(f.a) + np.size(f.b)) for p, f in adapters.items()}
