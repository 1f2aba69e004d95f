"""Checksums of arrays that do not depend on how the arrays are laid out.

:func:`fingerprints` gives each array of a tree a 64-bit checksum that is a function of
its global value alone (dtype and shape aside): the sum mod 2**32, in two independent
lanes, of a hash of every 32-bit word and its global row-major position, where for a
fixed position the hash is a bijection of the word (MurmurHash3's finalizer). So:

* any one changed word always changes it; more changes collide with probability
  ~2**-64 (the hash of a word at a position is pseudo-random);
* a sharded jax array is hashed where it lies: each device hashes its own shards and
  one small reduction (an integer sum, exact in any order) combines them, so every
  process of a multi-process run gets the same value without gathering the array, and
  the same value on any mesh, on one device, or for the numpy copy.

:func:`checksums` (SHA-256 of the bytes) is kept for manifests of format 1.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.types import PyTree

_M1, _M2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9
_LANES = (0x243F6A88, 0xB7E15162)


def _fmix(xp: Any, h: Any) -> Any:
    """MurmurHash3's 32-bit finalizer (a bijection of uint32)."""
    u = xp.uint32
    h = h ^ (h >> u(16))
    h = h * u(_M1)
    h = h ^ (h >> u(13))
    h = h * u(_M2)
    return h ^ (h >> u(16))


def _lane_sums(xp: Any, words: Any, index: Any) -> list[Any]:
    u = xp.uint32
    return [xp.sum(_fmix(xp, words ^ _fmix(xp, index * u(_GOLDEN) + u(seed))), dtype=u)
            for seed in _LANES]


def _numpy_words(a: np.ndarray) -> np.ndarray:
    """The array as row-major uint32 words: one per element below 4 bytes (zero-extended),
    ``itemsize / 4`` per element otherwise (little-endian order)."""
    a = np.ascontiguousarray(a).reshape(-1)
    if a.dtype == np.bool_:
        return a.astype(np.uint32)
    if a.dtype.itemsize < 4:
        return a.view(f"u{a.dtype.itemsize}").astype(np.uint32)
    return a.view("<u4")


def _jax_words(x: jax.Array) -> jax.Array:
    """:func:`_numpy_words` of a jax array, without reshaping it (shards stay put): the
    words have ``x``'s shape, plus a trailing axis for 8-byte and larger dtypes."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size < 4:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _jax_leaf_sums(x: jax.Array) -> list[jax.Array]:
    words = _jax_words(x)
    index, stride = jnp.zeros(words.shape, jnp.uint32), 1
    for dim in reversed(range(words.ndim)):  # the row-major position, shard by shard
        index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim) * jnp.uint32(
            stride % 2**32)
        stride *= words.shape[dim]
    return _lane_sums(jnp, words, index)


# One program per leaf shape: a program over all leaves at once holds the words and
# positions of every leaf together (several times the checkpoint's size on a CPU).
_jax_sums = jax.jit(_jax_leaf_sums)


def _digest(lanes: Any) -> str:
    return "".join(f"{int(np.asarray(v)):08x}" for v in lanes)


def fingerprints(tree: PyTree) -> dict[str, str]:
    """The layout-independent checksum of each array of ``tree`` (see the module
    docstring), keyed by its path. Numpy arrays are hashed on the host; jax arrays where
    they lie (one jitted reduction per leaf). With several processes every
    process must call it (it runs a collective) and all get the same values."""
    out: dict[str, str] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path)
        if isinstance(leaf, jax.Array):
            out[key] = _digest(_jax_sums(leaf))
        else:
            words = _numpy_words(np.asarray(leaf))
            out[key] = _digest(_lane_sums(np, words, np.arange(words.size, dtype=np.uint32)))
    return {k: out[k] for k in sorted(out)}


def tensor_specs(tree: PyTree) -> dict[str, list]:
    """``[shape, dtype]`` of each array of ``tree``, keyed by its path."""
    return {jax.tree_util.keystr(p): [list(x.shape), np.dtype(x.dtype).name]
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checksums(tree: PyTree) -> dict[str, str]:
    """SHA-256 of each array of ``tree`` (dtype, shape and bytes), keyed by its path: the
    checksums of format-1 manifests (needs arrays addressable by this process)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
        out[jax.tree_util.keystr(path)] = h.hexdigest()
    return out
