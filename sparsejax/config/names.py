"""The names that choose a variant, declared once (standard library only): the losses,
the models, the backends and the mask draws check against these, and the command line
takes its choices from here."""

GRPO_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo",
                                     "vespo", "rloo")
IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")
ADVANTAGE_ESTIMATORS: tuple[str, ...] = ("grpo", "rloo")  # group-mean or leave-one-out baseline
LR_SCHEDULER_TYPES: tuple[str, ...] = ("constant", "linear", "cosine")
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "orpo")
DPO_REFERENCE_FREE_LOSS_TYPES: tuple[str, ...] = ("sft", "simpo", "orpo")  # use no reference
DPO_F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence",
                                      "alpha_divergence")
DPO_F_DIVERGENCE_LOSS_TYPES: tuple[str, ...] = (  # built on the chosen-rejected score difference
    "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")
KTO_KL_LOSS_TYPES: tuple[str, ...] = ("kto",)  # estimate the KL reference point
MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "qwen3_moe")
REMAT_POLICIES: tuple[str, ...] = ("none", "layer", "dots")
BACKENDS: tuple[str, ...] = ("auto", "xla", "pallas", "interpret")
MASK_STRATEGIES: tuple[str, ...] = ("per_tensor", "global", "row_balanced")
LORA_RATIOS_FORMAT = "sparsejax.lora.ratios"  # the "format" of a Partial-LoRA ratios file
