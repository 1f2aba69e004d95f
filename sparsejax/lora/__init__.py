"""LoRA, masked LoRA and Partial-LoRA (arXiv 2512.22495) beside the frozen decoder.

* :mod:`~sparsejax.lora.adapters`: factors, :class:`LoraWeight`, attach / merge.
* :mod:`~sparsejax.lora.peft_io`: PEFT's adapter format (PEFT and vLLM load it), merged HF save.
* :mod:`~sparsejax.lora.masked`: masks on the factors (masked LoRA).
* :mod:`~sparsejax.lora.importance`: SVD leverage / magnitude importance of pre-trained weights.
* :mod:`~sparsejax.lora.ratios`: Partial-LoRA's per-layer ratios, Partial / Targeted masks, JSON.

Training an adapter: :class:`sparsejax.trainable.LoraAdapter`.
"""

from sparsejax._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    "sparsejax.lora.adapters": (
        "DEFAULT_TARGETS", "Adapters", "Factors", "LoraConfig", "LoraWeight", "attach",
        "check_adapters", "detach", "init_adapters", "kernel_shapes", "merge",
        "num_parameters", "select_targets"),
    "sparsejax.lora.importance": ("entry_importance", "leverage_scores", "row_col_importance"),
    "sparsejax.lora.masked": ("apply_mask", "densities", "factor_masks", "full_masks"),
    "sparsejax.lora.peft_io": ("load_peft", "save_merged_hf", "save_peft"),
    "sparsejax.lora.ratios": ("Ratios", "derive_ratios", "load_ratios", "partial_lora_masks",
                              "save_ratios", "targeted_lora_masks"),
})
