"""Optimizers over masks and over whole models.

:mod:`sparsejax.optim.sparse`: ``sparse_adamw`` (an optax transformation whose moments
hold only the active entries) and ``fused_sparse_adamw`` (the in-place step);
:mod:`sparsejax.optim.dense`: ``dense_adamw``, full finetuning behind the same fused
interface; :mod:`sparsejax.optim.adamw_math`: the AdamW arithmetic every backend and
kernel shares (imported by the kernels, so this package imports nothing eagerly).
"""

from sparsejax._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    "sparsejax.optim.dense": ("DenseAdamWState", "dense_adamw", "needs_master_weights"),
    "sparsejax.optim.sparse": ("FusedOptimizer", "FusedSparseAdamW", "SparseAdamWState",
                               "StepInfo", "clip_compressed", "fused_sparse_adamw",
                               "global_norm", "sparse_adamw"),
})
