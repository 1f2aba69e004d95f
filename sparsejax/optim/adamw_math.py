"""The AdamW arithmetic of one step, shared by every backend and kernel.

:class:`AdamWScalars` are the step's runtime scalars and :class:`IndexedStep` the
contract of an indexed AdamW step on one tensor (implemented by
:func:`sparsejax.backends.xla_indexed_adamw_step` and the Pallas kernel in
:mod:`sparsejax.kernels.indexed_adamw`); :func:`adamw_delta` and its halves are the
update of ``optax.adamw``, op for op. Depends on nothing of sparsejax, so that the
kernels and the backend switch both sit above it.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp


class AdamWScalars(NamedTuple):
    """Runtime float32 scalars of one AdamW step (traced, so a new step never recompiles).

    ``bias_correction1 = 1 - b1**t`` and ``bias_correction2 = 1 - b2**t`` for step ``t``
    (counted from 1), as optax computes them. ``one_minus_b1 = 1 - b1`` is computed by
    the caller in the precision of ``b1`` (float64 for a Python float, as optax does),
    which differs from ``1 - float32(b1)`` in the last bit.
    """

    learning_rate: jax.Array
    b1: jax.Array
    b2: jax.Array
    eps: jax.Array
    eps_root: jax.Array
    weight_decay: jax.Array
    bias_correction1: jax.Array
    bias_correction2: jax.Array
    one_minus_b1: jax.Array
    one_minus_b2: jax.Array


class IndexedStep(Protocol):

    def __call__(
            self,
            param: jax.Array,
            grad: jax.Array,
            indices: jax.Array,
            mu: jax.Array,
            nu: jax.Array,
            master: jax.Array | None,
            scalars: AdamWScalars,
            *,
            grad_is_compressed: bool = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        ...


def adamw_delta(p, g, mu, nu, s: AdamWScalars):
    """The AdamW update of ``optax.adamw`` on float32 values (any shape), op for op.

    With ``t`` the step, ``lr`` the learning rate and ``wd`` the weight decay
    (Loshchilov & Hutter, decoupled weight decay)::

        mu' = (1 - b1) g + b1 mu            nu' = (1 - b2) g^2 + b2 nu
        delta = -lr * ((mu' / (1 - b1^t)) / (sqrt(nu' / (1 - b2^t) + eps_root) + eps)
                       + wd * p)

    Returns ``(delta, mu', nu')`` in float32; the new value is ``p + delta``.
    """
    mu, nu = adamw_moments(g, mu, nu, s)
    return adamw_delta_from_moments(p, mu, nu, s), mu, nu


def adamw_moments(g, mu, nu, s: AdamWScalars):
    """The first half of :func:`adamw_delta`: the new moments ``(mu', nu')``."""
    return s.one_minus_b1 * g + s.b1 * mu, s.one_minus_b2 * (g * g) + s.b2 * nu


def adamw_delta_from_moments(p, mu, nu, s: AdamWScalars):
    """The second half of :func:`adamw_delta`: ``delta`` from the new moments."""
    update = (mu / s.bias_correction1) / (
        jnp.sqrt(nu / s.bias_correction2 + s.eps_root) + s.eps)
    update = update + s.weight_decay * p
    return -s.learning_rate * update


def adamw_math(p, g, mu, nu, s: AdamWScalars):
    """:func:`adamw_delta` applied: returns ``(p + delta, mu', nu')`` in float32."""
    delta, mu, nu = adamw_delta(p, g, mu, nu, s)
    return p + delta, mu, nu
