"""The settings every training run shares (the loop, evaluation, checkpoints, layout)."""

from __future__ import annotations

import dataclasses

from sparsejax.config.fields import check_choice, check_fields, setting
from sparsejax.config.names import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The loop, evaluation, checkpoints and the devices' layout of a run.

    ``mesh`` lays the run out on devices (:func:`sparsejax.parallel.sharding.parse_mesh`:
    ``""`` one device, ``"auto"`` every device on FSDP, ``"data=2,fsdp=4"``); batch sizes
    must then be multiples of ``data x fsdp``.
    """

    steps: int = setting(100, "optimizer steps of the run")
    eval_every: int = setting(25, "evaluate every N steps (0: only at the end)")
    eval_on_start: bool = setting(False, "also evaluate the model before the first step")
    save_every: int = setting(10, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = setting(2, "newest checkpoints kept on disk")
    save_hf_every: int = setting(
        0, "also write the policy in Hugging Face format to <out-dir>/snapshots/step_N "
        "every N steps (0: never), e.g. for predicting a mask from early deltas")
    seed: int = setting(0, "seeds the data order and sampling")
    logprob_chunk_size: int = setting(1024, "tokens projected to the vocabulary at once")
    remat: str = setting(
        "layer", "what the backward pass recomputes: layer keeps only each layer's input "
        "(least memory), dots also the matmul outputs, none keeps all",
        choices=REMAT_POLICIES)
    mesh: str = setting(
        "", "devices of the run: data=D,fsdp=F (D x F = all devices), auto (every device on "
        "fsdp) or empty (one device)")

    def __post_init__(self):
        check_fields(self, {"steps": {"low": 1}, "eval_every": {"low": 0},
                            "save_every": {"low": 0},
                            "save_hf_every": {"low": 0}, "keep_checkpoints": {"low": 1},
                            "seed": {"low": 0}, "logprob_chunk_size": {"low": 1}})
        check_choice("remat", self.remat, REMAT_POLICIES)
