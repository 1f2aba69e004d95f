"""One factory from the settings to what trains."""

from __future__ import annotations

from typing import Any

from sparsejax.config import AdapterConfig, TrainableConfig
from sparsejax.config.adapter import check_ratios_file
from sparsejax.trainable.base import Trainable
from sparsejax.types import PyTree


def build_trainable(config: TrainableConfig, params: PyTree, *,
                    adapter: AdapterConfig | None = None, mask: PyTree | None = None,
                    mesh: Any = None, model_name: str | None = None,
                    total_steps: int | None = None) -> Trainable:
    """What trains in a run, from its settings.

    Args:
      config: the mask (sparsity, or ``mask_path``) and the optimizer.
      params: the base params (shapes are enough for full finetuning and sparse
        entries; a LoRA adapter reads the kernels for Targeted-LoRA's importance).
      adapter: a LoRA adapter instead of the model's own entries (``kind != "none"``);
        the base model is frozen and ``config``'s mask settings are not used.
      mask: sparse entries: this mask instead of the one ``config`` draws or loads.
      mesh: lay the run out on this mesh (:mod:`sparsejax.parallel.sharding`).
      model_name: the model a ratios file must have been derived on (Partial-LoRA).
      total_steps: the run's optimizer steps, which a decaying learning rate
        (``lr_scheduler_type`` linear or cosine) and ``warmup_ratio`` need.

    Returns:
      :class:`~sparsejax.trainable.full.FullFinetuning`,
      :class:`~sparsejax.trainable.sparse.SparseEntries` or
      :class:`~sparsejax.trainable.lora.LoraAdapter`.
    """
    if adapter is not None and adapter.kind != "none":
        return _lora(config, params, adapter, mesh, model_name, total_steps)
    if config.dense and mask is None:
        from sparsejax.trainable.full import FullFinetuning
        return FullFinetuning(config, params, mesh=mesh, total_steps=total_steps)
    from sparsejax.trainable.sparse import SparseEntries
    return SparseEntries(config, params, mask, mesh=mesh, total_steps=total_steps)


def _lora(config: TrainableConfig, params: PyTree, adapter: AdapterConfig, mesh: Any,
          model_name: str | None, total_steps: int | None) -> Trainable:
    from sparsejax import lora
    from sparsejax.trainable.lora import LoraAdapter
    cfg = lora.LoraConfig(rank=adapter.lora_rank, alpha=adapter.lora_alpha,
                          targets=adapter.lora_targets, rslora=adapter.lora_rslora)
    factors = lora.init_adapters(params, cfg, seed=adapter.lora_seed)
    mask = None
    if adapter.kind == "lora" and adapter.lora_density < 1.0:
        mask = lora.factor_masks(factors, adapter.lora_density, seed=adapter.lora_seed)
    elif adapter.kind != "lora":
        check_ratios_file(adapter.lora_ratios)
        ratios = lora.load_ratios(adapter.lora_ratios, params, model=model_name)
        if adapter.kind == "partial-lora":
            mask = lora.partial_lora_masks(factors, ratios, seed=adapter.lora_seed)
        else:
            settings = ratios.settings
            mask = lora.targeted_lora_masks(
                factors, ratios, params, importance=settings.get("importance", "leverage"),
                svd_rank=int(settings.get("svd_rank", 8)))
    return LoraAdapter(config, params, cfg, adapters=factors, mask=mask, mesh=mesh,
                       kind=adapter.kind, total_steps=total_steps)
