"""The scales an experiment runs at: the model, task, rollout shape and learning rates.

* ``quick``: the 75k-parameter demo model and its toy addition task that ship with the
  package (``sparsejax/demo``); every pipeline end to end in a few minutes, for tests.
* ``cpu``: SmolLM2-135M-Instruct (``sparsejax smollm2``; a dequantized Q4_1 GGUF, close
  to but not equal to the original bf16 weights) on the ``arithmetic`` task (greedy base
  accuracy 20%), 20 steps of 8 prompts x 8 samples x <= 64 tokens, evaluated on 256
  held-out problems; each arm takes about 15 minutes on a 2-core CPU. A micro-batch is one
  group, so that groups whose rewards are all equal (most, at this accuracy) skip their
  forward/backward exactly. The run is 5x
  shorter than the paper's, so both learning rates are 10x the paper's (1e-5 full,
  1e-3 at 99%), keeping its 100x ratio.
* ``paper``: the Multiple Ticket Hypothesis GSM8K setting (Qwen2.5-0.5B-Instruct, 32
  prompts x 16 samples per step, 100 steps, LR 1e-4 at 99% and 1e-6 for full
  finetuning, no KL), for a GPU.

The learning rate of a sparse arm grows with sparsity as in the Multiple Ticket
Hypothesis (1e-4 at 99% to 1e-2 at 99.999% at paper scale): log-linear in the density,
``lr(s) = lr_sparse * ((1 - 0.99) / (1 - s)) ** lr_exponent`` with ``lr_exponent =
2/3``.
"""

from __future__ import annotations

import dataclasses
import os

REFERENCE_SPARSITY = 0.99


@dataclasses.dataclass(frozen=True)
class Scale:
    """One scale of the experiments (see the module docstring).

    Attributes:
        name: ``quick``, ``cpu`` or ``paper``.
        model: a model folder or hub id; ``"smollm2"`` is the SmolLM2 checkpoint that
            :func:`sparsejax.models.smollm2.smollm2_checkpoint` writes once, ``"demo"``
            the shipped demo model.
        data_flags: the flags that choose the task (and, for ``quick``, the demo).
        steps, warmup_steps: optimizer steps of an arm; of BSR's dense warm-up.
        lr_full, lr_sparse, lr_exponent: full finetuning's LR; the sparse LR at 99% and
            its growth with sparsity.
        lr_lora: the LoRA arms' LR (10x full finetuning's, alpha = 2 x rank).
        flags: every other flag of an arm (rollout shape, evaluation, dtype, ...).
        plan: ``experiments/memory_plan.py`` flags that shape-check an arm of this scale
            (the preset and rollout shape), or None.
    """

    name: str
    model: str
    data_flags: tuple[str, ...]
    steps: int
    warmup_steps: int
    lr_full: float
    lr_sparse: float
    lr_exponent: float
    lr_lora: float
    flags: tuple[str, ...]
    plan: tuple[str, ...] | None = None

    def lr(self, sparsity: float) -> float:
        """The learning rate of an arm that freezes ``sparsity`` of the weights."""
        if sparsity == 0:
            return self.lr_full
        return self.lr_sparse * ((1 - REFERENCE_SPARSITY) / (1 - sparsity)) ** self.lr_exponent

    def model_path(self) -> str:
        """The model folder (writing the SmolLM2 checkpoint on first use)."""
        if self.model == "smollm2":
            from sparsejax.models.smollm2 import smollm2_checkpoint
            return os.fspath(smollm2_checkpoint())
        if self.model == "demo":
            from sparsejax.cli.tasks import DEMO_DIR
            return DEMO_DIR
        return self.model

    def arm_flags(self, model: str) -> list[str]:
        """The flags every arm of this scale shares."""
        return ["--model", model, *self.data_flags, "--steps", str(self.steps), *self.flags]


SCALES = {
    "quick": Scale(
        name="quick", model="demo", data_flags=("--demo",), steps=4, warmup_steps=2,
        lr_full=1e-3, lr_sparse=3e-2, lr_exponent=2 / 3, lr_lora=1e-2,
        flags=("--prompts-per-step", "8", "--num-generations", "4",
               "--micro-batch-size", "32", "--generation-batch-size", "32", "--eval-every", "2",
               "--eval-limit", "32", "--save-every", "2")),
    "cpu": Scale(
        name="cpu", model="smollm2", data_flags=("--task", "arithmetic"), steps=20,
        warmup_steps=3, lr_full=1e-5, lr_sparse=1e-3, lr_exponent=2 / 3, lr_lora=1e-4,
        flags=("--dtype", "float32", "--remat", "none", "--prompts-per-step", "8",
               "--num-generations", "8", "--max-new-tokens", "64",
               "--generation-batch-size", "64", "--micro-batch-size", "8",
               "--eval-every", "10", "--eval-limit", "256", "--eval-batch-size", "64",
               "--save-every", "5")),
    "paper": Scale(
        name="paper", model="Qwen/Qwen2.5-0.5B-Instruct", data_flags=("--task", "gsm8k"),
        steps=100, warmup_steps=5, lr_full=1e-6, lr_sparse=1e-4, lr_exponent=2 / 3,
        lr_lora=1e-5,
        flags=("--dtype", "bfloat16", "--prompts-per-step", "32", "--num-generations", "16",
               "--max-new-tokens", "1024", "--eval-every", "25", "--save-every", "10"),
        plan=("--preset", "Qwen2.5-0.5B", "--prompts-per-step", "32", "--num-generations",
              "16", "--completion-length", "1024", "--budgets", "80")),
}
