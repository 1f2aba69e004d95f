"""sparsejax: sparse RL finetuning of LLMs in JAX.

Train 1% (down to 0.001%) of the weights with GRPO or DPO: masks that pick the
trained entries, and an AdamW whose state holds only those entries.
"""

import importlib

# Names resolve on first use (PEP 562), so that ``import sparsejax`` (and every
# ``python -m sparsejax.<tool> --help``) does not pay for importing jax.
_EXPORTS = {
    "sparsejax.masks": (
        "Density", "density", "diff_mask", "from_dense", "intersection_size", "jaccard",
        "load_mask", "num_active", "overlap", "random_baselines", "random_mask", "save_mask",
        "to_dense", "topk_mask", "validate_mask"),
    "sparsejax.optim": (
        "FusedOptimizer", "FusedSparseAdamW", "SparseAdamWState", "StepInfo",
        "fused_sparse_adamw", "sparse_adamw"),
    "sparsejax.dense_adamw": ("dense_adamw",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_WHERE))


__all__ = sorted(_WHERE)
__version__ = "0.1.0"
