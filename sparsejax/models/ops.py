"""The model's matmul and embedding lookup, exact in float32 and lean in low precision.

:func:`matmul` and :func:`take_rows` are the only ways the decoder (and the sampler's
output projection) touches a weight. For a float32 array they are ``jnp.matmul`` and
``w[tokens]``. For bfloat16/float16 they keep the operands in their dtype and sum in
float32 (:func:`matmul`), and move 16-bit rows as integers (:func:`take_rows`), so
XLA:CPU makes no float32 copies of whole weights. :func:`transpose` views a tied
embedding as the output matrix without a transpose op.

A weight object that is not an array (a masked matrix of the sparse backward,
:class:`sparsejax.sparse_backward.SparseWeight`, or a LoRA kernel,
:class:`sparsejax.lora.LoraWeight`) applies itself: :func:`matmul` calls its
``rmatmul(x, preferred_element_type=...)``, :func:`take_rows` its ``take_rows(tokens)``,
:func:`transpose` its ``T``. The model therefore depends on none of them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["Transposed", "matmul", "take_rows", "transpose"]

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@jax.tree_util.register_pytree_node_class
class Transposed:
    """``weight.T`` as :func:`matmul` takes it: ``x @ weight.T`` without a transpose op.

    XLA:CPU runs a bf16 dot natively only for some layouts; a transposed bf16 weight
    makes it convert the whole weight to float32 (a tied output matrix, ``embed.T``).
    Make one with :func:`transpose`; any use other than :func:`matmul` sees ``weight.T``.
    """

    def __init__(self, weight):
        self.weight = weight

    def tree_flatten(self):
        return (self.weight,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)[::-1]

    @property
    def dtype(self):
        return self.weight.dtype

    @property
    def T(self):
        return self.weight

    def __jax_array__(self):
        return self.weight.T


def transpose(w):
    """``w.T`` for :func:`matmul`: a :class:`Transposed` view of an array (no transpose
    op is traced), or a weight object's (or a view's) own ``T``."""
    if isinstance(w, jax.Array):
        return Transposed(w)
    return w.T


def is_low_precision(x, w) -> bool:
    return jnp.dtype(x.dtype) in _LOW_PRECISION and jnp.dtype(w.dtype) == jnp.dtype(x.dtype)


def _contract(a, b, a_dim: int, b_dim: int):
    """float32 ``dot_general`` contracting axis ``a_dim`` of ``a`` with ``b_dim`` of ``b``
    (``b`` as stored: a transposed operand makes XLA:CPU convert a bf16 dot's operands
    to float32)."""
    return jax.lax.dot_general(a, b, (((a_dim,), (b_dim,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _split(dy, dtype):
    """``dy`` as one or two ``dtype`` halves whose sum is ``dy`` to about 16 bits
    (``hi = dy`` rounded, ``lo = dy - hi`` rounded); one half if ``dy`` is ``dtype``."""
    if dy.dtype == dtype:
        return (dy,)
    hi = dy.astype(dtype)
    return hi, (dy - hi.astype(dy.dtype)).astype(dtype)


def flat_tokens(x):
    return x.reshape(-1, x.shape[-1])


def low_precision_dx(dy, weight, transposed: bool):
    """float32 ``dy @ W^T`` for ``W = weight.T if transposed else weight``. A float32
    ``dy`` is split (:func:`_split`), so the dots keep the weight's low-precision dtype
    (a mixed-dtype dot would convert the weight to float32)."""
    w_dim = 0 if transposed else 1
    return sum(_contract(d, weight, d.ndim - 1, w_dim) for d in _split(dy, weight.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_precision_matmul(x, weight, transposed, out_dtype):
    """``(x @ W).astype(out_dtype)``, ``W = weight.T if transposed else weight``, for
    low-precision ``x, weight``: float32 products and sums, rounded once.

    The dots of the forward and backward pass take their operands in the low
    precision, as a GPU runs them. A plain bf16 ``jnp.matmul`` (or JAX's transpose of
    a dot with ``preferred_element_type=float32``) makes XLA:CPU convert whole weights
    to float32 and keep those copies alive across a decode loop or a layer's
    backward. The values are those XLA:CPU computed for the plain matmul."""
    return _contract(x, weight, x.ndim - 1, 1 if transposed else 0).astype(out_dtype)


def _low_precision_matmul_fwd(x, weight, transposed, out_dtype):
    return _low_precision_matmul(x, weight, transposed, out_dtype), (x, weight)


def _low_precision_matmul_bwd(transposed, out_dtype, res, dy):
    x, weight = res
    dx = low_precision_dx(dy, weight, transposed).astype(x.dtype)
    x2 = flat_tokens(x)
    parts = [flat_tokens(d) for d in _split(dy, weight.dtype)]
    if transposed:  # weight [out, in]: dweight = dy^T x
        dw = sum(_contract(d, x2, 0, 0) for d in parts)
    else:           # weight [in, out]: dweight = x^T dy
        dw = sum(_contract(x2, d, 0, 0) for d in parts)
    return dx, dw.astype(weight.dtype)


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def dense_matmul(x, weight, transposed, preferred_element_type):
    if is_low_precision(x, weight):
        out = x.dtype if preferred_element_type is None else preferred_element_type
        return _low_precision_matmul(x, weight, transposed, jnp.dtype(out))
    return jnp.matmul(x, weight.T if transposed else weight,
                      preferred_element_type=preferred_element_type)


def matmul(x: jax.Array, w, *, preferred_element_type=None) -> jax.Array:
    """``x @ w`` for an array, a :class:`Transposed` view or a weight object.

    For float32 arrays this is exactly ``jnp.matmul`` (a :class:`Transposed` ``w``:
    ``jnp.matmul(x, w.weight.T)``). For bfloat16/float16 ``x`` and ``w`` of the same
    dtype the dots of the forward and backward pass take their operands in that dtype
    and sum in float32, the result rounded once to the input dtype (or to
    ``preferred_element_type``): the values XLA computes for a plain low-precision
    ``jnp.matmul``, without its float32 copies of the weights. A float32 cotangent
    meets a low-precision weight as two low-precision halves (about 16 bits kept).
    A weight object with ``rmatmul`` computes the product itself.
    """
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"matmul: x {x.shape} does not fit a weight of shape {w.shape}")
    if hasattr(w, "rmatmul"):
        return w.rmatmul(x, preferred_element_type=preferred_element_type)
    if isinstance(w, Transposed):
        return dense_matmul(x, w.weight, True, preferred_element_type)
    return dense_matmul(x, w, False, preferred_element_type)


# ----------------------------------------------------------------------------- lookup


def gather_rows(weight, tokens):
    """``weight[tokens]``; a 16-bit weight's rows move as 16-bit integers (the same
    values, bit for bit): XLA:CPU converts a whole bf16 tensor to float32 around a
    gather, a float32 copy of the embedding per lookup. The barrier ties the weight to
    the tokens, so that inside a decode loop XLA cannot hoist the bitcast out of the
    loop (where it would become a copy of the whole embedding)."""
    if jnp.dtype(weight.dtype) in _LOW_PRECISION:
        weight, tokens = jax.lax.optimization_barrier((weight, tokens))
        bits = jax.lax.bitcast_convert_type(weight, jnp.uint16)
        return jax.lax.bitcast_convert_type(bits[tokens], weight.dtype)
    return weight[tokens]


@jax.custom_vjp
def _low_precision_take_rows(weight, tokens):
    return gather_rows(weight, tokens)


def _low_precision_take_rows_fwd(weight, tokens):
    return gather_rows(weight, tokens), (weight, tokens)


def _low_precision_take_rows_bwd(res, dh):
    weight, tokens = res
    # The ordinary gradient of an indexing (a scatter-add into the weight's shape).
    (dw,) = jax.vjp(lambda w: w[tokens], weight)[1](dh)
    return dw, None


_low_precision_take_rows.defvjp(_low_precision_take_rows_fwd, _low_precision_take_rows_bwd)


def take_rows(w, tokens: jax.Array) -> jax.Array:
    """Embedding lookup ``w[tokens]`` (exactly, for an array); a weight object with
    ``take_rows`` looks itself up."""
    if hasattr(w, "take_rows"):
        return w.take_rows(tokens)
    if jnp.dtype(w.dtype) in _LOW_PRECISION:
        return _low_precision_take_rows(w, tokens)
    return w[tokens]
