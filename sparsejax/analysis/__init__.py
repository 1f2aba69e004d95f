"""Analysis tools: how sparse RL updates are, and which entries they will touch.

* :mod:`~sparsejax.analysis.update_sparsity`: update sparsity, per-layer and
  per-matrix-type tables, update rank and the changed-entry mask between two Hugging
  Face checkpoints (Mukherjee et al., arXiv 2505.11711), read straight from
  safetensors one tensor at a time.
* :mod:`~sparsejax.analysis.scorers`: streaming magnitude / momentum / variance
  scores from early weight deltas (BSR-AdamW), to feed :func:`sparsejax.topk_mask`.
* :mod:`~sparsejax.analysis.predict_mask`: those scores over HF snapshot folders, laid out
  as the model's parameters, kept by global top-k: a mask ``--mask-path`` loads.
* ``python -m sparsejax.analysis {diff,overlap,predict-mask}``: the command line.
"""

import importlib

# Resolved on first use (PEP 562): ``python -m sparsejax.analysis --help`` imports no jax.
_EXPORTS = {
    "checkpoints": ("AnalysisError", "CheckpointReader", "load_checkpoint"),
    "overlap": ("OverlapReport", "mask_overlap"),
    "scorers": ("MagnitudeScorer", "MomentumScorer", "StreamingScorer", "VarianceScorer",
                "make_scorer", "score_trajectory"),
    "update_sparsity": ("DiffReport", "GroupDiff", "TensorDiff", "diff_checkpoints",
                        "layer_group", "matrix_type", "save_diff_mask", "update_rank",
                        "update_rank_fraction"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        module = importlib.import_module(f"sparsejax.analysis.{_WHERE[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsejax.analysis' has no attribute {name!r}")

