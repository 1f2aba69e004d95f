"""Mask files: one safetensors file of int32 index arrays, one per tensor path.

The format (``metadata["format"] == FORMAT``) lists the tensor paths in order, so a
mask loads back into the structure of the params it was drawn for and is validated
against them (:func:`sparsejax.masks.validate_mask`). Re-exported by
:mod:`sparsejax.masks`.
"""

from __future__ import annotations

import json

import numpy as np

from sparsejax.masks import core
from sparsejax.types import PyTree

Mask = core.Mask

FORMAT = "sparsejax.mask/1"


def save_mask(path: str, mask: Mask, metadata: dict[str, str] | None = None) -> None:
    """Writes ``mask`` to one safetensors file: one int32 array per tensor path."""
    from safetensors.numpy import save_file
    paths, leaves, _ = core.leaves_with_paths(mask)
    if len(set(paths)) != len(paths):
        raise ValueError("mask paths are not unique; cannot save")
    meta = {"format": FORMAT, "paths": json.dumps(paths)}
    for k, v in (metadata or {}).items():
        if k in meta:
            raise ValueError(f"metadata key {k!r} is reserved")
        meta[k] = str(v)
    save_file({p: np.ascontiguousarray(np.asarray(x, np.int32)) for p, x in zip(paths, leaves)},
              path, metadata=meta)


def load_mask(path: str, like: PyTree | None = None) -> tuple[Mask, dict[str, str]]:
    """Reads a mask written by :func:`save_mask`; returns ``(mask, metadata)``.

    With ``like`` (the params, or any tree of the same structure) the mask comes back
    in that structure and is validated against it; without, as a ``{path: array}`` dict.
    """
    from safetensors import safe_open
    try:
        handle = safe_open(path, framework="numpy")
    except Exception as e:  # safetensors' own errors
        raise ValueError(f"{path} is not a readable mask file "
                         f"({str(e).splitlines()[0]})") from None
    with handle as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a sparsejax mask file (metadata field "
                             f"format is {meta.get('format')!r}, expected {FORMAT!r})")
        try:
            listed = json.loads(meta["paths"])
        except KeyError:
            raise ValueError(f"{path}: metadata field paths is missing") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata field paths is not valid JSON: {e}") from None
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise ValueError(f"{path}: metadata field paths must be a list of tensor paths")
        stored = set(f.keys())
        unknown = sorted(stored - set(listed))
        if unknown:
            raise ValueError(f"{path} holds tensor(s) its metadata field paths does not "
                             f"list: {unknown[:5]}")
        absent = [p for p in listed if p not in stored]
        if absent:
            raise ValueError(f"{path}: metadata field paths lists tensor(s) the file does "
                             f"not hold: {absent[:5]}")
        arrays = {k: f.get_tensor(k) for k in listed}
    user_meta = {k: v for k, v in meta.items() if k not in ("format", "paths")}
    if like is None:
        return arrays, user_meta
    paths, _, treedef = core.leaves_with_paths(like)
    missing = [p for p in paths if p not in arrays]
    if missing or len(paths) != len(arrays):
        raise ValueError(f"mask file {path} does not match the tree: missing {missing[:5]}, "
                         f"extra {sorted(set(arrays) - set(paths))[:5]}")
    mask = core.unflatten(treedef, [arrays[p] for p in paths])
    core.validate_mask(mask, like)
    return mask, user_meta
