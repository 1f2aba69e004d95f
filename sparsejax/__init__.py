"""sparsejax: sparse RL finetuning of LLMs in JAX.

Train 1% (down to 0.001%) of the weights with GRPO or DPO: masks that pick the
trained entries, and an AdamW whose state holds only those entries.
"""

from sparsejax._lazy import lazy_exports

# Names resolve on first use, so that ``import sparsejax`` (and every ``--help``) does
# not pay for importing jax.
__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    "sparsejax.masks": (
        "Density", "density", "diff_mask", "from_dense", "intersection_size", "jaccard",
        "load_mask", "num_active", "overlap", "random_baselines", "random_mask", "save_mask",
        "to_dense", "topk_mask", "validate_mask"),
    "sparsejax.optim": (
        "FusedOptimizer", "FusedSparseAdamW", "SparseAdamWState", "StepInfo",
        "dense_adamw", "fused_sparse_adamw", "sparse_adamw"),
})
__version__ = "0.1.0"
