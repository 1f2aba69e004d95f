"""Type aliases shared across the package (documentation for readers; no runtime checks)."""

from typing import Any

PyTree = Any
"""A JAX pytree of arrays (params, gradients, optimizer state)."""

Mask = Any
"""A pytree shaped like the params whose leaves are sorted ``int32`` flat indices of the
active entries (:mod:`sparsejax.masks`)."""
