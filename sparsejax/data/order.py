"""The order in which a run visits its data (a function of the step: resumable)."""

from __future__ import annotations

import numpy as np


def prompt_order(num_prompts: int, step: int, per_step: int, seed: int) -> np.ndarray:
    """Indices of the prompts of ``step``: consecutive slices of per-epoch permutations."""
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), num_prompts)
        perm = np.random.default_rng([seed, epoch]).permutation(num_prompts)
        out.extend(perm[offset:offset + per_step - len(out)].tolist())
    return np.asarray(out)
