"""Hugging Face weight I/O for :class:`~sparsejax.models.decoder.Decoder`.

Loading reads safetensors only (one file, or shards listed in
``model.safetensors.index.json``), memory-mapped through ``safetensors.safe_open``;
each parameter is read straight into its final placement (an optional sharding), so
with a sharding only the slices a device owns are read. No pickle is ever loaded and
no remote code is ever run. Every HF tensor name is mapped to a parameter path by ONE
table, :data:`WEIGHT_RULES` (:mod:`sparsejax.models.hf_names`); saving uses the same
table in reverse and writes a folder that ``transformers`` ``from_pretrained`` loads.
A mixture-of-experts layer's stacked ``[E, in, out]`` expert kernels are read from and
written as the Hub's per-expert tensors (``mlp.experts.{e}.gate_proj.weight`` ...).

Guarantees:
    * a checkpoint loads only if every parameter is found with the right shape and no
      tensor is left over; otherwise :class:`WeightLoadError` names every missing,
      unexpected and mis-shaped tensor at once (tensors known to be redundant, such as
      ``rotary_emb.inv_freq`` buffers or ``lm_head.weight`` of a tied model, are skipped);
    * ``load_hf(save_hf(model))`` reproduces the parameters exactly (same dtype).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sparsejax.models.config import DecoderConfig, from_hf_config
from sparsejax.models.decoder import Decoder
from sparsejax.models.hf_names import (  # noqa: F401  (the table is part of this module's API)
    _REDUNDANT,
    FIELDS,
    WEIGHT_RULES,
    WeightRule,
    hf_to_param,
    hf_to_param_slice,
    param_to_hf,
)
from sparsejax.parallel import sharding

if TYPE_CHECKING:
    from jax.sharding import Mesh

from sparsejax.types import PyTree

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

class WeightLoadError(ValueError):
    """A checkpoint does not fit the model; the message names every offending tensor."""


ShardingSpec = (jax.sharding.Sharding | Callable[[str], jax.sharding.Sharding | None]
                | Any | None)


def _keypath_str(keypath) -> str:
    parts = []
    for k in keypath:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def _sharding_lookup(sharding: ShardingSpec) -> Callable[[str], jax.sharding.Sharding | None]:
    """Turns a sharding spec (None, one Sharding, a function or a pytree) into a lookup."""
    if sharding is None:
        return lambda path: None
    if isinstance(sharding, jax.sharding.Sharding):
        return lambda path: sharding
    if callable(sharding):
        return sharding
    leaves = jax.tree_util.tree_flatten_with_path(
        sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    table = {_keypath_str(kp): s for kp, s in leaves}
    return lambda path: table[path]


def resolve_checkpoint_dir(source: str | os.PathLike, revision: str | None = None) -> str:
    """A local folder for ``source``: the folder itself, or a Hub snapshot of the repo id.

    Only configs, safetensors and tokenizer files are downloaded (never pickles).
    """
    path = os.fspath(source)
    if os.path.isdir(path):
        return path
    if not looks_like_hub_id(path):
        if os.path.exists(path):
            raise FileNotFoundError(f"{path!r} is not a model folder")
        raise FileNotFoundError(f"model folder {path!r} does not exist")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(
            repo_id=path, revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model",
                            "*.jinja"])
    except OSError as e:  # every hub client error: offline, not found, gated, HTTP
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FileNotFoundError(
            f"model {path!r} not found: no local folder of that name, and the Hugging Face "
            f"Hub gave no snapshot{'' if revision is None else f' at revision {revision!r}'}"
            f" ({type(e).__name__}: {reason})") from e


def looks_like_hub_id(path: str) -> bool:
    """Whether ``path`` can only mean a Hub repo id (``name`` or ``org/name``), not a
    local path: a missing local folder must be reported, not looked up on the Hub."""
    if os.path.exists(path) or path.startswith((".", "/", "~")) or "\\" in path:
        return False
    parts = path.split("/")
    if len(parts) > 2 or not all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", p)
                                 for p in parts):
        return False
    # "models/foo" next to an existing ./models folder is a local path that is missing.
    return len(parts) == 1 or not os.path.isdir(parts[0])


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise WeightLoadError(f"{index} is not valid JSON: {e}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise WeightLoadError(f"{index}: field weight_map (tensor name -> file) is "
                                  "missing or not an object of file names")
        files = sorted({os.path.join(folder, v) for v in weight_map.values()})
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise WeightLoadError(f"{index} lists shard(s) that do not exist: "
                                  + ", ".join(os.path.basename(f) for f in absent[:5]))
        return files
    single = os.path.join(folder, SAFETENSORS_SINGLE)
    if os.path.exists(single):
        return [single]
    found = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.endswith(".safetensors"))
    if not found:
        raise FileNotFoundError(
            f"no safetensors weights in {folder!r} (pickled .bin/.pt checkpoints are "
            "never loaded; convert them to safetensors first)")
    return found


def _is_float_dtype(name: str) -> bool:
    """Whether a safetensors dtype name (``F32``, ``BF16``, ``I64``, ...) is a float."""
    return name.upper().startswith(("F", "BF"))


def _read_fn(slice_obj, transpose: bool, dtype) -> Callable[[Any], np.ndarray]:
    """A reader of one index of the (transposed) tensor from a lazy safetensors slice."""

    def read(index=None) -> np.ndarray:
        if index is None:
            arr = slice_obj[:]
        else:
            idx = tuple(index)
            arr = slice_obj[tuple(reversed(idx)) if transpose else idx]
        arr = np.asarray(arr)
        if transpose:
            arr = arr.T
        return np.ascontiguousarray(arr.astype(dtype))

    return read


def _stacked_read_fn(experts: list[Callable[[Any], np.ndarray]]
                     ) -> Callable[[Any], np.ndarray]:
    """A reader of one index of a stacked ``[E, ...]`` parameter from its experts' readers
    (axis 0 of the index picks the experts; only their requested slices are read)."""

    def read(index=None) -> np.ndarray:
        if index is None:
            return np.stack([r() for r in experts])
        idx = tuple(index)
        return np.stack([experts[e](idx[1:]) for e in range(len(experts))[idx[0]]])

    return read


def load_hf_params(source: str | os.PathLike, config: DecoderConfig, *,
                   sharding: ShardingSpec = None, strict: bool = True,
                   revision: str | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """``(graphdef, params)`` of a :class:`Decoder` with ``config``, filled from ``source``.

    Args:
        source: a local model folder or a Hub repo id.
        config: the model config (its ``param_dtype`` is the dtype the weights get).
        sharding: where to place each param: None (default device), one
            ``jax.sharding.Sharding`` for all, a function ``path -> Sharding`` (path like
            ``"layers.3.attn.q_proj.kernel"``), or a pytree of shardings shaped like
            the params (e.g. from ``nnx.get_named_sharding``).
        strict: raise on unexpected tensors (missing / mis-shaped always raise).
        revision: Hub revision when ``source`` is a repo id.

    Raises:
        WeightLoadError: naming each missing, unexpected or mis-shaped tensor.
    """
    folder = resolve_checkpoint_dir(source, revision)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    expected = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(abstract)}
    place = _sharding_lookup(sharding)
    dtype = config.dtype

    handles = []
    for file in _safetensors_files(folder):
        try:
            handles.append(safe_open(file, framework="numpy"))
        except Exception as e:  # safetensors' own errors
            raise WeightLoadError(f"{file} is not a readable safetensors file "
                                  f"({str(e).splitlines()[0]})") from None
    # path -> (slice, transpose, name); a stacked path -> {expert: (slice, transpose, name)}
    found: dict[str, Any] = {}
    misshaped: set[str] = set()
    problems: list[str] = []
    for handle in handles:
        for name in handle.keys():
            mapped = hf_to_param_slice(name)
            if mapped is None or mapped[0] not in expected or (
                    mapped[2] is not None and mapped[2] >= expected[mapped[0]].shape[0]):
                if _REDUNDANT.match(name) or (name == "lm_head.weight"
                                              and config.tie_word_embeddings):
                    continue
                if strict:
                    problems.append(f"unexpected tensor {name!r} (no parameter of this "
                                    "model corresponds to it)")
                continue
            path, transpose, expert = mapped
            sl = handle.get_slice(name)
            if not _is_float_dtype(sl.get_dtype()):
                problems.append(f"tensor {name!r} holds {sl.get_dtype()} values; a weight "
                                "must be floating point (it is never cast from integers)")
                misshaped.add(path)
                continue
            shape = tuple(sl.get_shape())
            want = tuple(expected[path].shape)[0 if expert is None else 1:]
            got = tuple(reversed(shape)) if transpose else shape
            if got != want:
                want_hf = tuple(reversed(want)) if transpose else want
                problems.append(f"tensor {name!r} has shape {shape}, expected {want_hf} "
                                f"(parameter {path!r})")
                misshaped.add(path)
                continue
            if expert is None:
                found[path] = (sl, transpose, name)
            else:
                found.setdefault(path, {})[expert] = (sl, transpose, name)
    for path, var in expected.items():
        if path in misshaped:
            continue
        hf_name = param_to_hf(path)[0]
        if "{e}" not in hf_name:
            if path not in found:
                problems.append(f"missing tensor {hf_name!r} (parameter {path!r})")
            continue
        problems += [f"missing tensor {hf_name.format(e=e)!r} (parameter {path!r}, expert {e})"
                     for e in range(var.shape[0]) if e not in found.get(path, {})]
    if problems:
        raise WeightLoadError(f"checkpoint {folder!r} does not fit the model:\n  "
                              + "\n  ".join(problems))

    for path, var in nnx.to_flat_state(abstract):
        key = ".".join(map(str, path))
        if isinstance(found[key], dict):
            read = _stacked_read_fn([_read_fn(sl, transpose, dtype) for sl, transpose, _ in (
                found[key][e] for e in range(var.shape[0]))])
        else:
            sl, transpose, _ = found[key]
            read = _read_fn(sl, transpose, dtype)
        target = place(key)
        if target is None:
            arr = jnp.asarray(read())
        else:
            arr = jax.make_array_from_callback(tuple(var.shape), target, read)
        var.set_value(arr)
    return graphdef, abstract


def load_hf(source: str | os.PathLike, *, config: DecoderConfig | None = None,
            param_dtype: str = "float32", attention_impl: str = "auto",
            sharding: ShardingSpec = None, strict: bool = True,
            revision: str | None = None) -> Decoder:
    """A :class:`Decoder` with the weights of a HF Llama 3.x / Qwen2 / Qwen3 (dense or
    MoE) checkpoint.

    Args:
        source: a local folder (``config.json`` + safetensors) or a Hub repo id
            (downloaded with ``huggingface_hub.snapshot_download``).
        config: overrides the folder's ``config.json``.
        param_dtype: parameter dtype when ``config`` is not given ("bfloat16" for real
            runs, "float32" for tests).
        attention_impl: see :class:`DecoderConfig`.
        sharding, strict, revision: see :func:`load_hf_params`.
    """
    folder = resolve_checkpoint_dir(source, revision)
    if config is None:
        config = from_hf_config(folder, param_dtype=param_dtype,
                                attention_impl=attention_impl)
    graphdef, params = load_hf_params(folder, config, sharding=sharding, strict=strict)
    return nnx.merge(graphdef, params)


def host_array(x: Any) -> np.ndarray:
    """``x`` as one host numpy array, gathered from any mesh and any process
    (:func:`sparsejax.parallel.distributed.host_array`; with several processes every process must
    call it, in the same order): one tensor at a time bounds the memory."""
    from sparsejax.parallel import distributed
    return distributed.host_array(x)


def hf_state_dict(model: Decoder, dtype: str | None = None, *, keep: bool = True
                  ) -> dict[str, np.ndarray]:
    """The model's weights as HF-named host numpy arrays (in ``dtype``, default the
    params'), gathered tensor by tensor from any mesh (:func:`host_array`). With
    ``keep=False`` (the processes that do not write) each tensor is dropped once gathered."""
    np_dtype = jnp.dtype(dtype or model.config.param_dtype)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(map(str, path))
        name, transpose = param_to_hf(key)
        arr = host_array(var.get_value())
        if not keep:
            continue
        if "{e}" in name:  # stacked experts: one HF tensor per slice
            for e in range(arr.shape[0]):
                out[name.format(e=e)] = np.ascontiguousarray(
                    (arr[e].T if transpose else arr[e]).astype(np_dtype))
        else:
            out[name] = np.ascontiguousarray((arr.T if transpose else arr).astype(np_dtype))
    return out


def _shard_groups(names: Iterable[str], sizes: Mapping[str, int],
                  max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    total = 0
    for name in names:
        if groups[-1] and total + sizes[name] > max_shard_bytes:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += sizes[name]
    return groups


def save_hf(model: Decoder, folder: str | os.PathLike, *, tokenizer: Any = None,
            dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes ``model`` as a HF checkpoint folder that transformers loads.

    Writes ``config.json``, the weights as safetensors (``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``
    when larger than ``max_shard_bytes``) and, when ``tokenizer`` is given, its files
    (``tokenizer.save_pretrained``). Returns the folder.

    Args:
        model: the decoder (``nnx.merge(graphdef, params)`` for a split model).
        folder: destination (created if needed).
        tokenizer: an optional transformers tokenizer to save beside the weights.
        dtype: dtype to write (default the params' dtype).
        max_shard_bytes: largest size of one safetensors file.

    Sharded params (any mesh, any number of processes) are gathered tensor by tensor;
    with several processes every process must call this and only process 0 writes.
    """
    from sparsejax.parallel import distributed
    folder = os.fspath(folder)
    main = distributed.is_main()
    tensors = hf_state_dict(model, dtype, keep=main)
    if not main:
        return folder
    os.makedirs(folder, exist_ok=True)
    names = sorted(tensors)
    sizes = {n: tensors[n].nbytes for n in names}
    groups = _shard_groups(names, sizes, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(groups) == 1:
        save_file({n: tensors[n] for n in names}, os.path.join(folder, SAFETENSORS_SINGLE),
                  metadata=metadata)
    else:
        weight_map = {}
        for k, group in enumerate(groups, start=1):
            fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: tensors[n] for n in group}, os.path.join(folder, fname),
                      metadata=metadata)
            weight_map.update({n: fname for n in group})
        with open(os.path.join(folder, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": sum(sizes.values())},
                       "weight_map": weight_map}, f, indent=2)
    hf_config = model.config.to_hf_config()
    hf_config["torch_dtype"] = str(jnp.dtype(dtype or model.config.param_dtype))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def hf_param_shardings(source: str, mesh: Mesh | None, *, param_dtype: str = "float32"
                       ) -> PyTree | None:
    """The rule table's shardings for the params of the HF model at ``source`` (read from
    its config alone, nothing allocated): pass as ``load_hf(..., sharding=)`` so every
    param is read straight into its shards. None without a mesh."""
    if mesh is None:
        return None
    config = from_hf_config(resolve_checkpoint_dir(source), param_dtype=param_dtype)
    _, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    return sharding.param_shardings(abstract, mesh)
