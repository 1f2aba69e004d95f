"""The base (reference) policy of the KL term and of DPO, as a "what trains" variant keeps it.

A trainer scores the base policy without knowing which variant trains: it asks its
trainable (:mod:`sparsejax.trainable.base`) for a :class:`BasePolicy` once, tells it
:meth:`~BasePolicy.before_change` before the params first stop being the base (an
update, a restored checkpoint), and scores inside :func:`scoring`. Two keepings:

* :class:`SwappedValues` (sparse entries, LoRA factors): the base values of the ``k``
  trained entries; scoring writes them into the params in place and back (no second
  model copy).
* :class:`ParamsCopy` (full finetuning): a copy of the base params, on the device from
  the start (scored every step: GRPO's KL) or on the host, taken just before the params
  first change and put back on the device to score (scored rarely: DPO).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.types import PyTree

__all__ = ["BasePolicy", "ParamsCopy", "SwappedValues", "scoring"]


class BasePolicy(Protocol):

    def before_change(self, params: PyTree) -> None:
        """Called with the base params before they first change."""

    def enter(self, params: PyTree, opt_state: PyTree) -> tuple[PyTree, PyTree, Any]:
        """``(policy params, params to score, token)``: the policy params may have been
        modified in place (then they are the params to score)."""

    def exit(self, params: PyTree, opt_state: PyTree, token: Any) -> PyTree:
        """The policy params again, from :meth:`enter`'s first result and token."""


class SwappedValues:
    """The base values of the trained entries, swapped in to score (sparse, LoRA).

    ``active_values(params, opt_state)`` reads the trained values; ``swap_active(params,
    indices, values)`` writes values in place and returns ``(params, previous values)``.
    """

    def __init__(self, params: PyTree, opt_state: PyTree, active_values: Callable,
                 swap_active: Callable):
        self.values = active_values(params, opt_state)
        self._swap = swap_active

    def before_change(self, params: PyTree) -> None:
        del params  # the base values were read at the start

    def enter(self, params, opt_state):
        params, current = self._swap(params, opt_state.indices, self.values)
        return params, params, current

    def exit(self, params, opt_state, token):
        params, _ = self._swap(params, opt_state.indices, token)
        return params


class ParamsCopy:
    """A copy of the base params (full finetuning): on the device now, or on the host
    just before the params first change (``on_host``; until then the params themselves
    are the base)."""

    def __init__(self, params: PyTree, *, on_host: bool):
        self.on_host = on_host
        self.copy = None if on_host else jax.tree.map(jnp.copy, params)
        self._pristine = True

    def before_change(self, params: PyTree) -> None:
        if self.on_host and self._pristine:
            self.copy = jax.tree.map(lambda x: np.array(x, copy=True), params)
        self._pristine = False

    def enter(self, params, opt_state):
        del opt_state
        if self.copy is None:  # on_host and never changed: the params are the base
            return params, params, None
        if not self.on_host:
            return params, self.copy, None
        shardings = jax.tree.map(lambda x: x.sharding, params)
        return params, jax.device_put(self.copy, shardings), None

    def exit(self, params, opt_state, token):
        del opt_state, token
        return params


@contextlib.contextmanager
def scoring(run: Any, base: BasePolicy) -> Iterator[PyTree]:
    """The base policy's params for the block; ``run.params`` (a trainer's policy params,
    possibly swapped in place meanwhile) are the policy's again after it."""
    run.params, params, token = base.enter(run.params, run.opt_state)
    try:
        yield params
    finally:
        run.params = base.exit(run.params, run.opt_state, token)
