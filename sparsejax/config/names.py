"""The names that choose a variant, declared once (standard library only): the losses,
the models, the backends and the mask draws check against these, and the command line
takes its choices from here."""

GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")
MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "qwen3")
REMAT_POLICIES: tuple[str, ...] = ("none", "layer", "dots")
BACKENDS: tuple[str, ...] = ("auto", "xla", "pallas", "interpret")
MASK_STRATEGIES: tuple[str, ...] = ("per_tensor", "global", "row_balanced")
LORA_RATIOS_FORMAT = "sparsejax.lora.ratios"  # the "format" of a Partial-LoRA ratios file
