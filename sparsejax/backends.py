"""The indexed AdamW step on one tensor, and the switch between its implementations.

Every backend implements the same contract, :func:`xla_indexed_adamw_step`'s: given a
parameter tensor, its gradient (dense, or already compressed to the active entries),
the sorted flat indices of the ``k`` active entries and their compressed moments, it
updates the moments and writes the new values of the active entries into the
parameter. Nothing of size ``N`` is read or written except those ``k`` entries
(and, for a dense gradient, the ``k`` gathered gradient values).

Backends:
    * ``"xla"``: gather/scatter in ``jax.numpy``; runs everywhere.
    * ``"pallas"``: the Pallas Triton-backend kernel in :mod:`sparsejax.kernels`
        (NVIDIA GPU).
    * ``"interpret"``: the same Pallas kernel interpreted on CPU, for tests.
    * ``"auto"``: ``"pallas"`` on an NVIDIA GPU, ``"xla"`` elsewhere.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from sparsejax.config.names import BACKENDS
from sparsejax.optim.adamw_math import IndexedStep, adamw_math


def xla_indexed_adamw_step(param, grad, indices, mu, nu, master, scalars, *,
                           grad_is_compressed=False):
    """Reference indexed AdamW step with jnp gather/scatter.

    Args:
        param: the parameter, any shape, float32 or bfloat16.
        grad: its gradient: same shape as ``param``, or shape ``(k,)`` when
            ``grad_is_compressed`` (the gradient values at ``indices``, in order).
        indices: ``(k,)`` int32, sorted unique indices into ``param.ravel()``.
        mu: ``(k,)`` first moment (float32 or a narrower ``mu_dtype``).
        nu: ``(k,)`` float32 second moment.
        master: ``(k,)`` float32 master copy of the active values, or None to
            read the current values from ``param``.
        scalars: the step's :class:`AdamWScalars`.

    Returns:
        ``(param, mu, nu, master)`` with the ``k`` active entries of ``param``
        replaced (``master`` is None when it was None).
    """
    flat = param.reshape(-1)
    g = grad.reshape(-1) if grad_is_compressed else grad.reshape(-1)[indices]
    p = master if master is not None else flat[indices].astype(jnp.float32)
    new_p, new_mu, new_nu = adamw_math(
        p, g.astype(jnp.float32), mu.astype(jnp.float32), nu, scalars)
    flat = flat.at[indices].set(new_p.astype(param.dtype),
                                indices_are_sorted=True, unique_indices=True)
    return (flat.reshape(param.shape), new_mu.astype(mu.dtype),
            new_nu.astype(nu.dtype), None if master is None else new_p)


def on_nvidia_gpu() -> bool:
    try:
        return any(d.platform == "gpu" and "NVIDIA" in d.device_kind.upper()
                              or d.platform == "cuda" for d in jax.devices())
    except RuntimeError:
        return False


def resolve_backend(backend: str) -> str:
    """Maps ``"auto"`` to a concrete backend and checks the name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "pallas" if on_nvidia_gpu() else "xla"
    return backend


def indexed_step_fn(backend: str) -> IndexedStep:
    """The indexed AdamW step implementation for ``backend``."""
    backend = resolve_backend(backend)
    if backend == "xla":
        return xla_indexed_adamw_step
    from sparsejax.kernels import indexed_adamw
    interpret = backend == "interpret"

    def step(param, grad, indices, mu, nu, master, scalars, *,
                      grad_is_compressed=False):
        return indexed_adamw.indexed_adamw_step(
                param, grad, indices, mu, nu, master, scalars,
                grad_is_compressed=grad_is_compressed, interpret=interpret)

    return step


# ----------------------------------------------------------------------------- sampled product

SAMPLED_ENTRY_CHUNK = 256
"""Active entries per step of :func:`xla_sampled_product` (fastest on the 2-core CPU)."""

SAMPLED_TOKEN_CHUNK = 8192
"""Tokens per step of :func:`xla_sampled_product`. The gathers fuse into the
products' reduction, so memory stays small without token chunks; with the entry
chunk this still bounds any gathered operand XLA might materialize to
``2 x 256 x 8192`` floats (16 MiB), whatever ``k`` and the token count."""


class SampledProduct(Protocol):
    """``f(x [T, in], dy [T, out], a, b) -> (k,)`` float32: ``sum_t x[t, a[j]] * dy[t, b[j]]``."""

    def __call__(self, x: jax.Array, dy: jax.Array, a: jax.Array, b: jax.Array
                 ) -> jax.Array:
        ...


def xla_sampled_product(xt, dyt, a, b, *, entry_chunk: int = SAMPLED_ENTRY_CHUNK,
                        token_chunk: int = SAMPLED_TOKEN_CHUNK):
    """Reference sampled dense-dense product: ``out[j] = sum_t xt[a[j], t] * dyt[b[j], t]``.

    Args:
        xt: ``[in, T]`` the layer inputs, transposed (so each gathered row is contiguous).
        dyt: ``[out, T]`` the output cotangents, transposed.
        a, b: ``(k,)`` int32 coordinates of the active entries of the ``[in, out]``
            weight (any order).

    Returns:
        ``(k,)`` float32: the weight gradient ``(x^T dy)[a, b]`` at the active entries,
        with float32 products and sums. Memory is bounded by the chunks (``entry_chunk``
        entries x ``token_chunk`` tokens gathered at a time), never ``[T, k]`` or
        ``[in, out]``.

    The entries are visited in the order of the coordinate of the larger operand
    (a stable sort; the results go back to the callers' order), so consecutive
    entries read the same rows of the operand that does not fit in cache and the
    other operand's rows are the ones read at random. Each chunk's gathers fuse into
    the row sums (no gathered ``[entries, tokens]`` array is written): on the
    2-core CPU this is several times faster than entries in mask order.
    """
    k, t = a.shape[0], xt.shape[1]
    if k == 0 or t == 0:
        return jnp.zeros((k,), jnp.float32)
    a, b = a.astype(jnp.int32), b.astype(jnp.int32)
    order = jnp.argsort(b if dyt.shape[0] >= xt.shape[0] else a, stable=True)
    e = min(entry_chunk, k)
    n_e = -(-k // e)
    pad = n_e * e - k  # padded entries read entry (0, 0) and are dropped
    a_c = jnp.pad(a[order], (0, pad)).reshape(n_e, e)
    b_c = jnp.pad(b[order], (0, pad)).reshape(n_e, e)
    tc = min(token_chunk, t)
    n_t = -(-t // tc)
    t_pad = n_t * tc - t  # zero tokens add nothing
    split = lambda m: jnp.pad(m, ((0, 0), (0, t_pad))).reshape(
        m.shape[0], n_t, tc).transpose(1, 0, 2)  # [n_t, rows, tc]

    def tokens_step(acc, chunk):
        xs, ds = chunk

        def entries_step(ab):
            ai, bi = ab
            prod = (xs.at[ai].get(mode="promise_in_bounds").astype(jnp.float32)
                    * ds.at[bi].get(mode="promise_in_bounds").astype(jnp.float32))
            return jnp.sum(prod, axis=-1)

        return acc + jax.lax.map(entries_step, (a_c, b_c)), None

    acc = jnp.zeros((n_e, e), jnp.float32)
    if n_t == 1:
        out, _ = tokens_step(acc, (xt, dyt))
    else:
        out, _ = jax.lax.scan(tokens_step, acc, (split(xt), split(dyt)))
    return jnp.zeros((k,), jnp.float32).at[order].set(
        out.reshape(-1)[:k], unique_indices=True)


def _xla_token_major(x, dy, a, b):
    return xla_sampled_product(x.T, dy.T, a, b)


def _xla_or_cpu_kernel(x, dy, a, b):
    """The C++ kernel where XLA runs on the CPU and the kernel builds, else XLA's gather."""
    from sparsejax.kernels import cpu_sampled_product
    if not cpu_sampled_product.available():
        return _xla_token_major(x, dy, a, b)
    return jax.lax.platform_dependent(x, dy, a, b, cpu=cpu_sampled_product.sampled_product,
                                      default=_xla_token_major)


def sampled_product_fn(backend: str) -> SampledProduct:
    """The sampled dense-dense product for ``backend``, on token-major operands.

    ``f(x [T, in], dy [T, out], a, b)[j] = sum_t x[t, a[j]] * dy[t, b[j]]`` in float32
    (:func:`xla_sampled_product`'s result, whose operands are the transposes). ``"xla"``
    runs on the CPU as the C++ kernel of :mod:`sparsejax.kernels.cpu_sampled_product`
    (an XLA custom call, several times faster than XLA's gather there) when it builds,
    else, and on other platforms, as :func:`xla_sampled_product`; ``"pallas"`` /
    ``"interpret"``: the Triton kernel.
    """
    backend = resolve_backend(backend)
    if backend == "xla":
        return _xla_or_cpu_kernel
    from sparsejax.kernels import sampled_matmul
    interpret = backend == "interpret"
    return lambda x, dy, a, b: sampled_matmul.sampled_product(x.T, dy.T, a, b,
                                                              interpret=interpret)
