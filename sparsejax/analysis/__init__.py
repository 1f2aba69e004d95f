"""Analysis tools: how sparse RL updates are, and which entries they will touch.

* :mod:`~sparsejax.analysis.update_sparsity`: update sparsity, per-layer and
  per-matrix-type tables, update rank and the changed-entry mask between two Hugging
  Face checkpoints (Mukherjee et al., arXiv 2505.11711), read straight from
  safetensors one tensor at a time.
* :mod:`~sparsejax.analysis.scorers`: streaming magnitude / momentum / variance
  scores from early weight deltas (BSR-AdamW), to feed :func:`sparsejax.topk_mask`.
* ``python -m sparsejax.analysis {diff,overlap}``: the command line.
"""

from sparsejax.analysis.checkpoints import AnalysisError, CheckpointReader, load_checkpoint
from sparsejax.analysis.overlap import OverlapReport, mask_overlap
from sparsejax.analysis.scorers import (
    MagnitudeScorer,
    MomentumScorer,
    StreamingScorer,
    VarianceScorer,
    make_scorer,
    score_trajectory,
)
from sparsejax.analysis.update_sparsity import (
    DiffReport,
    GroupDiff,
    TensorDiff,
    diff_checkpoints,
    layer_group,
    matrix_type,
    save_diff_mask,
    update_rank,
    update_rank_fraction,
)

__all__ = [
    "AnalysisError", "CheckpointReader", "load_checkpoint",
    "OverlapReport", "mask_overlap",
    "MagnitudeScorer", "MomentumScorer", "StreamingScorer", "VarianceScorer",
    "make_scorer", "score_trajectory",
    "DiffReport", "GroupDiff", "TensorDiff", "diff_checkpoints", "layer_group",
    "matrix_type", "save_diff_mask", "update_rank", "update_rank_fraction",
]
