"""LoRA, masked LoRA and Partial-LoRA (arXiv 2512.22495) beside the frozen decoder.

* :mod:`~sparsejax.lora.adapters`: factors, :class:`LoraWeight`, attach / merge.
* :mod:`~sparsejax.lora.peft_io`: PEFT's adapter format (PEFT and vLLM load it), merged HF save.
"""

from sparsejax.lora.adapters import (DEFAULT_TARGETS, Adapters, Factors, LoraConfig,
                                     LoraWeight, attach, check_adapters, detach,
                                     init_adapters, kernel_shapes, merge, num_parameters,
                                     select_targets)
from sparsejax.lora.peft_io import load_peft, save_merged_hf, save_peft
