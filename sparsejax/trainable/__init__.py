"""What trains: full finetuning, sparse entries or a LoRA adapter, behind one contract.

* :mod:`~sparsejax.trainable.base`: the :class:`Trainable` Protocol every variant
  implements, and what a trainer needs around it.
* :mod:`~sparsejax.trainable.full`: :class:`FullFinetuning`.
* :mod:`~sparsejax.trainable.sparse`: :class:`SparseEntries` (a mask's entries).
* :mod:`~sparsejax.trainable.lora`: :class:`LoraAdapter` (dense, masked, Partial- or
  Targeted-LoRA).
* :mod:`~sparsejax.trainable.reference`: how each keeps the base policy.
* :mod:`~sparsejax.trainable.build`: :func:`build_trainable`, the one factory.
"""

from sparsejax._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    "sparsejax.trainable.base": ("StepReport", "Trainable"),
    "sparsejax.trainable.build": ("build_trainable",),
    "sparsejax.trainable.full": ("FullFinetuning",),
    "sparsejax.trainable.lora": ("LoraAdapter",),
    "sparsejax.trainable.sparse": ("SparseEntries",),
})
