"""LoRA adapters beside the frozen decoder kernels (Hu et al., arXiv 2106.09685).

A kernel ``W [in, out]`` chosen by a target pattern gets two factors ``A [in, r]`` and
``B [r, out]``; the layer computes

    y = x @ W + scale * (x @ A) @ B,      scale = alpha / r   (rsLoRA: alpha / sqrt(r))

without ever forming ``W + scale * A @ B``. The factors live in their own pytree
(:data:`Adapters`: ``{kernel path: Factors(a, b)}``), apart from the base params, so
the base gets no gradient and no optimizer state. :func:`attach` gives the params the
decoder sees: each targeted kernel replaced by a :class:`LoraWeight` pytree node,
which :class:`sparsejax.models.decoder.Dense` applies through its ``rmatmul``.
Dropping the adapters (the base params themselves) is the policy with the adapter
switched off: no copy of the model.

Initialisation is PEFT's default (``init_lora_weights=True``): ``A`` kaiming-uniform
with ``a = sqrt(5)`` over its fan-in (``U(-1/sqrt(in), 1/sqrt(in))``), ``B`` zeros, so a
fresh adapter leaves the model's output unchanged exactly.

Layout: ``A`` is PEFT's ``lora_A.weight`` transposed (PEFT stores ``[r, in]``), ``B``
its ``lora_B.weight`` transposed (``[out, r]``); :mod:`sparsejax.lora.peft_io` converts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib
from sparsejax.models import ops
from sparsejax.types import PyTree

#: Short names of the decoder's projections (``q`` is ``q_proj`` ...).
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_TARGETS = PROJECTIONS
_KERNEL = re.compile(r"(?:^|/)layers/\d+/(?:attn|mlp)/\w+_proj/kernel\Z")


class Factors(NamedTuple):
    """One kernel's LoRA factors: ``a [in, r]`` and ``b [r, out]``."""

    a: jax.Array
    b: jax.Array


Adapters = dict  # {kernel path ("layers/0/attn/q_proj/kernel"): Factors}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which kernels get adapters and how they are scaled.

    Attributes:
      rank: ``r``, at least 1 and at most ``min(in, out)`` of every target.
      alpha: ``lora_alpha``; the update is scaled by ``alpha / r``
        (``alpha / sqrt(r)`` with ``rslora``, Kalajdzievski, arXiv 2312.03732).
      targets: projection short names (``q``, ``gate``...), module names
        (``q_proj``) or regexes searched in kernel paths (``layers/0/attn/q_proj/kernel``).
      rslora: rank-stabilised scaling.
      dtype: storage dtype of the factors (float32 unless told).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) \
                or self.rank < 1:
            raise ValueError(f"--lora-rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                and self.alpha > 0):
            raise ValueError(f"--lora-alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(
                t.strip() for t in self.targets.split(",") if t.strip()))
        if not self.targets:
            raise ValueError("--lora-targets names no target")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# ----------------------------------------------------------------------------- the node


@jax.tree_util.register_pytree_node_class
class LoraWeight:
    """A kernel as the decoder sees it with an adapter: ``base + scale * a @ b``, never formed.

    ``base`` is the frozen ``[in, out]`` kernel (a stop-gradient is applied where it
    is used, so no weight gradient is computed for it), ``a``/``b`` the factors and
    ``scale`` a static float. :meth:`rmatmul` is ``x @ base + scale * (x @ a) @ b``;
    the LoRA branch runs in the factors' dtype and is cast to the output's dtype.
    ``w[...]`` is ``w`` (as for an ``nnx.Param``'s value); any other use as an array raises.
    """

    def __init__(self, base, a, b, scale: float):
        self.base, self.a, self.b, self.scale = base, a, b, float(scale)

    def tree_flatten(self):
        return (self.base, self.a, self.b), (self.scale,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return self.base.dtype

    def __getitem__(self, key):
        if key is Ellipsis:
            return self
        raise TypeError("a LoraWeight supports only w[...]")

    def __jax_array__(self):
        raise TypeError("a LoraWeight reached an op other than Dense; merge the adapter "
                        "first (sparsejax.lora.merge)")

    def rmatmul(self, x: jax.Array, *, preferred_element_type=None) -> jax.Array:
        y = ops.matmul(x, jax.lax.stop_gradient(self.base),
                       preferred_element_type=preferred_element_type)
        lora = jnp.matmul(jnp.matmul(x.astype(self.a.dtype), self.a), self.b) * self.scale
        return y + lora.astype(y.dtype)


# ----------------------------------------------------------------------------- targets


def _param_path(keypath) -> str:
    """A kernel's path in masks' notation, without nnx's trailing ``/value``."""
    path = masks_lib.path_str(keypath)
    return path[:-len("/value")] if path.endswith("/value") else path


def _target_regex(target: str) -> re.Pattern:
    if target in PROJECTIONS:
        return re.compile(rf"/{target}_proj/kernel\Z")
    if re.fullmatch(r"\w+_proj", target):
        return re.compile(rf"/{target}/kernel\Z")
    try:
        return re.compile(target)
    except re.error as e:
        raise ValueError(f"--lora-targets entry {target!r} is not a name or regex: {e}") \
            from None


def kernel_shapes(params: PyTree) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every Dense kernel of the layers (what LoRA can target)."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, LoraWeight))[0]:
        path = _param_path(keypath)
        if _KERNEL.search(path):
            out[path] = tuple(int(d) for d in np.shape(leaf.base if isinstance(
                leaf, LoraWeight) else leaf))
    return out


def select_targets(params: PyTree, targets: Sequence[str]) -> list[str]:
    """The kernel paths the target patterns choose, in tree order; every pattern must
    choose at least one kernel (one-line ValueError naming it otherwise)."""
    shapes = kernel_shapes(params)
    chosen = set()
    for t in targets:
        rx = _target_regex(t)
        hits = [p for p in shapes if rx.search(p)]
        if not hits:
            raise ValueError(f"--lora-targets entry {t!r} matches no kernel of this model "
                             f"(kernels look like {next(iter(shapes), 'none')!r})")
        chosen.update(hits)
    return [p for p in shapes if p in chosen]


# ----------------------------------------------------------------------------- adapters


def init_adapters(params: PyTree, config: LoraConfig, seed: int = 0) -> Adapters:
    """Fresh factors for the targets of ``config``: ``A`` as PEFT initialises it
    (kaiming-uniform, ``a = sqrt(5)``: ``U(-1/sqrt(in), 1/sqrt(in))``), ``B = 0``.

    The draw of each kernel's ``A`` is a pure function of ``seed`` and its path (NumPy
    on the host: the same on every platform).
    """
    shapes = kernel_shapes(params)
    out = {}
    for path in select_targets(params, config.targets):
        din, dout = shapes[path]
        if config.rank > min(din, dout):
            raise ValueError(f"--lora-rank {config.rank} exceeds min(in, out) = "
                             f"{min(din, dout)} of {path} {shapes[path]}")
        rng = np.random.default_rng([int(seed), _path_hash(path)])
        bound = 1.0 / math.sqrt(din)
        a = rng.uniform(-bound, bound, (din, config.rank)).astype(np.float32)
        out[path] = Factors(jnp.asarray(a, config.dtype),
                            jnp.zeros((config.rank, dout), config.dtype))
    return out


def _path_hash(path: str) -> int:
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def check_adapters(params: PyTree, adapters: Adapters) -> None:
    """Refuses adapters that do not fit ``params`` (one line naming the kernel)."""
    shapes = kernel_shapes(params)
    for path, f in adapters.items():
        if path not in shapes:
            raise ValueError(f"adapter for {path}: this model has no such kernel")
        din, dout = shapes[path]
        a, b = np.shape(f.a), np.shape(f.b)
        if len(a) != 2 or len(b) != 2 or a[0] != din or b[1] != dout or a[1] != b[0]:
            raise ValueError(f"adapter for {path} has A {a}, B {b}; the kernel is "
                             f"{shapes[path]} (needs A (in, r), B (r, out))")


def _map_kernels(params: PyTree, fn) -> PyTree:
    """``params`` with each kernel leaf ``x`` at ``path`` replaced by ``fn(path, x)``."""
    def one(keypath, x):
        return fn(_param_path(keypath), x)
    return jax.tree_util.tree_map_with_path(
        one, params, is_leaf=lambda x: isinstance(x, LoraWeight))


def attach(params: PyTree, adapters: Adapters, scale: float) -> PyTree:
    """The params the decoder sees: targeted kernels as :class:`LoraWeight` (traceable)."""
    def one(path, x):
        f = adapters.get(path)
        if f is None:
            return x
        base = x.base if isinstance(x, LoraWeight) else x
        return LoraWeight(base, f.a, f.b, scale)
    return _map_kernels(params, one)


def detach(params: PyTree) -> tuple[PyTree, Adapters]:
    """Inverse of :func:`attach`: ``(base params, adapters)``."""
    found = {}

    def one(path, x):
        if isinstance(x, LoraWeight):
            found[path] = Factors(x.a, x.b)
            return x.base
        return x
    base = _map_kernels(params, one)
    return base, found


def merge(params: PyTree, adapters: Adapters, scale: float) -> PyTree:
    """Base params with each adapted kernel replaced by ``W + scale * A @ B`` (computed in
    float32, stored in the kernel's dtype): the model to save in HF format."""
    def one(path, x):
        f = adapters.get(path)
        if f is None:
            return x
        base = x.base if isinstance(x, LoraWeight) else x
        delta = jnp.matmul(f.a.astype(jnp.float32), f.b.astype(jnp.float32)) * scale
        return (base.astype(jnp.float32) + delta).astype(base.dtype)
    return _map_kernels(params, one)


def num_parameters(adapters: Adapters) -> int:
    """Entries of all factors (dense LoRA's trainable count)."""
    return int(sum(np.size(f.a) + np.size(f.b) for f in adapters.values()))


def to_numpy(adapters: Mapping[str, Factors]) -> Adapters:
    return {p: Factors(np.asarray(f.a), np.asarray(f.b)) for p, f in adapters.items()}
