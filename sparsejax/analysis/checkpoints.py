"""Read Hugging Face safetensors checkpoints one tensor at a time.

The analysis tools compare and score whole models without ever holding one in
memory: a :class:`CheckpointReader` memory-maps the safetensors file(s) of a folder
(``model.safetensors``, or the shards named by ``model.safetensors.index.json``) and
hands out single tensors, or row ranges of a tensor, on request. Only safetensors is
read; pickle files (``pytorch_model.bin``) are refused, never loaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class AnalysisError(ValueError):
    """Bad input to an analysis tool; the message is one line meant for the user."""


def _checkpoint_files(folder: str) -> dict[str, str]:
    """``{tensor name: file path}`` for the safetensors checkpoint in ``folder``."""
    if not os.path.exists(folder):
        raise AnalysisError(f"checkpoint folder not found: {folder}")
    if not os.path.isdir(folder):
        raise AnalysisError(f"not a folder: {folder} (expected a Hugging Face checkpoint folder)")
    index = os.path.join(folder, INDEX_FILE)
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AnalysisError(f"cannot read {index}: {e}") from None
        if not isinstance(weight_map, dict):
            raise AnalysisError(f"{index}: 'weight_map' is not an object")
        files = {}
        for name, shard in weight_map.items():
            path = os.path.join(folder, str(shard))
            if not os.path.isfile(path):
                raise AnalysisError(f"{index} names shard {shard}, which is missing")
            files[str(name)] = path
        return files
    if os.path.isfile(single):
        return {}  # filled from the file's own header by the reader
    raise AnalysisError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of one checkpoint folder.

    Guarantees: opening reads only the headers; :meth:`get` and :meth:`rows` read
    exactly the bytes of the tensor (or row range) asked for, so the caller's memory
    is bounded by what it holds, not by the model. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = os.fspath(folder)
        files = _checkpoint_files(self.folder)
        self._handles: dict[str, Any] = {}
        if not files:
            path = os.path.join(self.folder, SINGLE_FILE)
            files = {name: path for name in self._open(path).keys()}
        self._files = files
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        for name, path in files.items():
            handle = self._open(path)
            try:
                sl = handle.get_slice(name)
            except Exception as e:  # safetensors raises its own error type
                raise AnalysisError(f"{path}: tensor {name} listed in the index is missing "
                                    f"({e})") from None
            self._shapes[name] = tuple(int(d) for d in sl.get_shape())
            self._dtypes[name] = str(sl.get_dtype())

    def _open(self, path: str) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except Exception as e:
                raise AnalysisError(f"cannot open {path}: {e}") from None
        return self._handles[path]

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def names(self) -> list[str]:
        """Tensor names in a stable (sorted) order."""
        return sorted(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        """The safetensors dtype tag, e.g. ``"BF16"`` or ``"F32"``."""
        return self._dtypes[name]

    def numel(self, name: str) -> int:
        return int(math.prod(self._shapes[name]))

    def get(self, name: str) -> np.ndarray:
        """The whole tensor as a NumPy array in its stored dtype (bf16 via ``ml_dtypes``)."""
        return self._open(self._files[name]).get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` along axis 0 (the whole tensor for a scalar)."""
        if not self._shapes[name]:
            return self.get(name)
        return self._open(self._files[name]).get_slice(name)[start:stop]

    def row_chunks(self, name: str, max_elements: int = 1 << 24
                   ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first flat index, chunk)`` pairs covering the tensor in row order.

        Each chunk holds whole rows and at most ``max_elements`` entries (at least one
        row), so a caller's working memory stays bounded even for embedding tables.
        """
        shape = self._shapes[name]
        if not shape or shape[0] == 0:
            yield 0, self.get(name)
            return
        row = int(math.prod(shape[1:]))
        step = max(1, max_elements // max(row, 1))
        for start in range(0, shape[0], step):
            stop = min(shape[0], start + step)
            yield start * row, self.rows(name, start, stop)


def load_checkpoint(folder: str | os.PathLike[str], dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder as ``{name: array}`` cast to ``dtype``.

    For small models and tests; the streaming tools use :class:`CheckpointReader`.
    """
    with CheckpointReader(folder) as reader:
        return {name: np.asarray(reader.get(name), dtype) for name in reader.names()}
