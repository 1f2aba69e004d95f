"""LoRA adapters in PEFT's own format, and the merged model in HF format.

An adapter folder is what ``peft.PeftModel.save_pretrained`` writes and what
``PeftModel.from_pretrained`` and vLLM's LoRA loader read:

* ``adapter_config.json``: ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``use_rslora``,
  ``target_modules`` (module names such as ``q_proj``; a full-name regex when not
  every layer is adapted), ``bias: "none"``, ``fan_in_fan_out: false``;
* ``adapter_model.safetensors``: for each adapted module ``M`` (the HF name of its
  ``nn.Linear``, e.g. ``model.layers.0.self_attn.q_proj``),
  ``base_model.model.M.lora_A.weight [r, in]`` and ``base_model.model.M.lora_B.weight
  [out, r]``: the transposes of this library's ``A [in, r]`` and ``B [r, out]``.

Loading refuses (one-line ValueError naming the tensor or field) an adapter made for
another base model (a module this model lacks, a shape that does not fit) and PEFT
features this library does not implement (DoRA, per-module rank/alpha patterns,
trained biases, ``modules_to_save``). Module names map to parameter paths through the
one name table of :mod:`sparsejax.models.hf_io`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from sparsejax.lora.adapters import Adapters, Factors, LoraConfig, check_adapters, kernel_shapes, merge
from sparsejax.models import hf_io

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<f>[AB])"
                     r"(?:\.(?P<adapter>[\w-]+))?\.weight\Z")


def module_name(path: str) -> str:
    """The HF module name of a kernel path (``layers/0/attn/q_proj/kernel`` ->
    ``model.layers.0.self_attn.q_proj``)."""
    name, _ = hf_io.param_to_hf(path.replace("/", "."))
    return name[:-len(".weight")]


def kernel_path(module: str) -> str | None:
    """Inverse of :func:`module_name`; None for a module that is no decoder kernel."""
    found = hf_io.hf_to_param(module + ".weight")
    if found is None or not found[0].endswith(".kernel"):
        return None
    return found[0].replace(".", "/")


def _target_modules(paths: list[str], params_shapes: dict[str, tuple[int, ...]]):
    """PEFT's ``target_modules``: short module names when they cover every layer's
    kernels of those kinds, else a regex of the full module names."""
    kinds = sorted({p.split("/")[-2] for p in paths})
    covered = {p for p in params_shapes if p.split("/")[-2] in kinds}
    if covered == set(paths):
        return kinds
    return "|".join(re.escape(module_name(p)) for p in paths)


def save_peft(folder: str | os.PathLike, adapters: Adapters, config: LoraConfig, *,
              base_model_name_or_path: str | None = None, params: Any = None,
              dtype: str = "float32") -> str:
    """Writes ``adapters`` as a PEFT LoRA folder (see the module docstring); returns it.

    ``params`` (the base) lets ``target_modules`` be the short names when every layer
    is adapted; without it a full-name regex is written. ``dtype``: tensor dtype.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for path, f in adapters.items():
        m = module_name(path)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(
            np.asarray(f.a, np.float32).T.astype(dtype))
        tensors[f"{PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(
            np.asarray(f.b, np.float32).T.astype(dtype))
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    paths = list(adapters)
    shapes = kernel_shapes(params) if params is not None else {}
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "use_rslora": config.rslora,
        "target_modules": _target_modules(paths, shapes),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as fh:
        json.dump(cfg, fh, indent=2)
    return folder


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
    unsupported = {
        "use_dora": cfg.get("use_dora") not in (None, False),
        "fan_in_fan_out": cfg.get("fan_in_fan_out") not in (None, False),
        "bias": cfg.get("bias", "none") != "none",
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "lora_bias": bool(cfg.get("lora_bias")),
        "target_parameters": bool(cfg.get("target_parameters")),
        "trainable_token_indices": bool(cfg.get("trainable_token_indices")),
    }
    for field, bad in unsupported.items():
        if bad:
            raise ValueError(f"{path}: {field}={cfg.get(field)!r} is not supported here")
    return cfg


def load_peft(folder: str | os.PathLike, params: Any, *, dtype: str = "float32"
              ) -> tuple[Adapters, LoraConfig]:
    """``(adapters, config)`` from a PEFT LoRA folder, checked against the base ``params``.

    Raises a one-line ValueError naming the first tensor or field that does not fit:
    a module the model lacks, a factor whose shape does not fit its kernel or the rank
    ``r``, a factor without its partner.
    """
    folder = os.fspath(folder)
    cfg = _read_config(folder)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise ValueError(f"{folder}: no {WEIGHTS_NAME}")
    rank = cfg.get("r")
    shapes = kernel_shapes(params)
    found: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in load_file(weights).items():
        m = _TENSOR.match(name)
        if m is None:
            raise ValueError(f"{weights}: tensor {name} is not a LoRA factor "
                             "(expected base_model.model.<module>.lora_A/B.weight)")
        path = kernel_path(m["module"])
        if path is None or path not in shapes:
            raise ValueError(f"{weights}: tensor {name} names module {m['module']}, which "
                             "this model does not have")
        din, dout = shapes[path]
        want = (rank, din) if m["f"] == "A" else (dout, rank)
        if tuple(arr.shape) != want:
            raise ValueError(f"{weights}: tensor {name} has shape {tuple(arr.shape)}; this "
                             f"model's {path} {shapes[path]} with r={rank} needs {want}")
        found.setdefault(path, {})[m["f"]] = arr
    adapters = {}
    for path in shapes:  # tree order
        if path not in found:
            continue
        pair = found[path]
        if len(pair) != 2:
            missing = "B" if "A" in pair else "A"
            raise ValueError(f"{weights}: {module_name(path)} has no lora_{missing}.weight")
        adapters[path] = Factors(pair["A"].astype(np.float32).T.astype(dtype),
                                 pair["B"].astype(np.float32).T.astype(dtype))
    if not adapters:
        raise ValueError(f"{weights}: no LoRA factors")
    check_adapters(params, adapters)
    targets = cfg.get("target_modules")
    targets = tuple(targets) if isinstance(targets, list) else tuple(
        rf"\A{re.escape(p)}\Z" for p in adapters)
    config = LoraConfig(rank=int(rank), alpha=float(cfg.get("lora_alpha", 8)),
                        targets=targets, rslora=bool(cfg.get("use_rslora", False)),
                        dtype=dtype)
    return adapters, config


def save_merged_hf(folder: str | os.PathLike, graphdef: nnx.GraphDef, params: Any,
                   adapters: Adapters, config: LoraConfig, **save_kwargs) -> str:
    """The base with the adapter merged in (``W + scale * A @ B``), as a HF checkpoint
    folder (:func:`sparsejax.models.hf_io.save_hf`; ``save_kwargs`` go to it)."""
    merged = merge(params, adapters, config.scale)
    return hf_io.save_hf(nnx.merge(graphdef, merged), folder, **save_kwargs)
