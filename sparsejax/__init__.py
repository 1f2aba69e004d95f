"""sparsejax: sparse RL finetuning of LLMs in JAX.

Train 1% (down to 0.001%) of the weights with GRPO or DPO: masks that pick the
trained entries, and an AdamW whose state holds only those entries.
"""

from sparsejax.masks import (
    Density,
    density,
    diff_mask,
    from_dense,
    intersection_size,
    jaccard,
    load_mask,
    num_active,
    overlap,
    random_baselines,
    random_mask,
    save_mask,
    to_dense,
    topk_mask,
    validate_mask,
)
from sparsejax.optim import (
    FusedSparseAdamW,
    SparseAdamWState,
    StepInfo,
    fused_sparse_adamw,
    sparse_adamw,
)

__all__ = [
    "Density", "density", "diff_mask", "from_dense", "intersection_size", "jaccard",
    "load_mask", "num_active", "overlap", "random_baselines", "random_mask", "save_mask",
    "to_dense", "topk_mask", "validate_mask",
    "FusedSparseAdamW", "SparseAdamWState", "StepInfo", "fused_sparse_adamw", "sparse_adamw",
]
__version__ = "0.1.0"
