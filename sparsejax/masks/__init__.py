"""Masks: which entries of the weights train.

A mask is a pytree shaped like the params whose leaves are sorted ``int32`` flat indices
of the active entries (:mod:`sparsejax.masks.core`: constructors, metrics, validation);
:mod:`sparsejax.masks.io` saves and loads them as safetensors files and
:mod:`sparsejax.masks.indexing` gathers and scatters a tensor's values at a leaf.
"""

from sparsejax.masks.core import (
                                  STRATEGIES,
                                  Density,
                                  Mask,
                                  density,
                                  diff_mask,
                                  from_dense,
                                  intersection_size,
                                  jaccard,
                                  num_active,
                                  overlap,
                                  path_str,
                                  random_baselines,
                                  random_mask,
                                  to_dense,
                                  topk_mask,
                                  validate_mask,
)
from sparsejax.masks.io import FORMAT, load_mask, save_mask

__all__ = ["FORMAT", "STRATEGIES", "Density", "Mask", "density", "diff_mask", "from_dense",
           "intersection_size", "jaccard", "load_mask", "num_active", "overlap", "path_str",
           "random_baselines", "random_mask", "save_mask", "to_dense", "topk_mask",
           "validate_mask"]
