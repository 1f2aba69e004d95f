"""Configuration of a DPO run, kept apart from the trainer that runs it."""

from __future__ import annotations

import dataclasses

from sparsejax.losses.dpo import DPO_LOSS_TYPES


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO run settings (the optimizer and mask live in :class:`SparseConfig`).

    Each step takes ``batch_size`` preference pairs (consecutive slices of per-epoch
    permutations of the dataset, seeded by ``seed``), runs them ``micro_batch_size``
    pairs at a time (chosen and rejected completions of a micro-batch share one
    forward pass of ``2 * micro_batch_size`` sequences), accumulates the gradient and
    takes one optimizer step.

    Attributes:
        steps: optimizer steps of the run.
        batch_size: preference pairs per step.
        micro_batch_size: pairs per forward/backward pass; divides ``batch_size``.
        beta: inverse temperature of the implicit reward (``tau`` for IPO).
        loss_type: ``"sigmoid" | "ipo" | "hinge" | "robust"`` (see ``losses.dpo``).
        label_smoothing: label-flip probability (cDPO for sigmoid, robust DPO).
        max_prompt_length: prompts longer than this lose tokens from the left.
        max_completion_length: completions (EOS included) lose tokens from the right.
        eval_every: evaluate every this many steps (0: only at the end).
        eval_limit: evaluate on at most this many eval pairs (None: all).
        save_every: checkpoint every this many steps (0: only at the end).
        keep_checkpoints: newest checkpoints kept on disk.
        seed: seeds the data order.
        logprob_chunk_size: tokens projected to the vocabulary at once.
        reference_free: no reference model (its log-probs are 0).
        remat: the decoder's rematerialization in the backward pass, ``none`` |
            ``layer`` | ``dots`` (:class:`~sparsejax.models.DecoderConfig` ``remat``).
        mesh: the devices' layout (:func:`sparsejax.sharding.parse_mesh`: ``""`` one
            device, ``"auto"``, ``"data=2,fsdp=4"``); ``micro_batch_size`` must then be
            a multiple of ``data x fsdp``.
    """

    steps: int = 100
    batch_size: int = 8
    micro_batch_size: int = 4
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    max_prompt_length: int = 512
    max_completion_length: int = 512
    eval_every: int = 0
    eval_limit: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    logprob_chunk_size: int = 1024
    reference_free: bool = False
    remat: str = "layer"
    mesh: str = ""

    def __post_init__(self):
        for name in ("steps", "batch_size", "micro_batch_size", "max_prompt_length",
                     "max_completion_length", "keep_checkpoints", "logprob_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1 (or None), got {self.eval_limit}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of "
                             f"micro_batch_size ({self.micro_batch_size})")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of "
                             f"{DPO_LOSS_TYPES}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        eps = self.label_smoothing
        if self.loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
            raise ValueError(f"label_smoothing for 'sigmoid' must be in [0, 0.5], got {eps}")
        if self.loss_type == "robust" and not 0.0 <= eps < 0.5:
            raise ValueError(f"label_smoothing for 'robust' must be in [0, 0.5), got {eps}")
        if self.loss_type in ("ipo", "hinge") and eps != 0.0:
            raise ValueError(f"label_smoothing must be 0 for loss_type {self.loss_type!r}, "
                             f"got {eps}")
        from sparsejax.models.config import REMAT_POLICIES  # pylint: disable=g-import-not-at-top
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
