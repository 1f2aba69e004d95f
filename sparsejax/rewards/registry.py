"""Rewards by name, user reward functions from ``module:function`` / ``path.py:function``, weighted sums.

A reward spec (what ``--reward`` takes) is ``NAME`` or ``NAME=WEIGHT`` where ``NAME`` is

* a built-in: ``gsm8k``, ``math``, ``exact``, ``format`` (see :data:`REWARDS`);
* ``package.module:function``: a function importable from ``sys.path``;
* ``path/to/file.py:function``: a function in a Python file (relative to the working directory).

A user function has the signature of every reward (:class:`sparsejax.rewards.RewardFn`)::

    def my_reward(completions: list[str], answers: list, **kwargs) -> list[float]:
        return [1.0 if c.strip().endswith(str(a)) else 0.0 for c, a in zip(completions, answers)]

It is called once per batch and must return one finite float (or ``nan``: unscorable) per
completion; :func:`reward_from_specs` checks that at every call, with a one-line error naming it.
Keyword arguments (``prompts``, ``completion_ids``, the data's columns: see
:mod:`sparsejax.rewards.arguments`) reach each term as its signature asks: all of them with
``**kwargs``, else the ones it names (``def by_level(completions, answers, level)``); a
function of ``(completions, answers)`` gets none.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sparsejax.rewards.arguments import call_reward, check_reward_arguments
from sparsejax.rewards.base import check_batch
from sparsejax.rewards.numeric import gsm8k_accuracy_reward
from sparsejax.rewards.symbolic import math_reward, require_math_verify
from sparsejax.rewards.text import exact_match_reward, format_reward

__all__ = ["REWARDS", "CombinedReward", "combine_rewards", "get_reward", "load_reward_function",
           "parse_reward_spec", "reward_from_specs"]

REWARDS: dict[str, Callable[..., list[float]]] = {
    "gsm8k": gsm8k_accuracy_reward,
    "math": math_reward,
    "exact": exact_match_reward,
    "format": format_reward,
}
"""The built-in rewards by name."""


def _check_signature(fn: Any, spec: str) -> None:
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {type(fn).__name__} object is not callable.")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked at call time
    try:  # later parameters are keyword arguments (columns), checked against the data
        signature.bind_partial(["completion"], ["answer"])
    except TypeError as err:
        raise ValueError(f"reward {spec!r}: must accept (completions, answers, **kwargs); {err}.") from None


def load_reward_function(spec: str) -> Callable[..., list[float]]:
    """The function named by ``module:function`` or ``path.py:function``; one-line ``ValueError`` if not."""
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ValueError(f"reward {spec!r}: expected a built-in ({', '.join(REWARDS)}), "
                         "'module:function' or 'path.py:function'.")
    target, _, name = spec.rpartition(":")
    if not target or not name.isidentifier():
        raise ValueError(f"reward {spec!r}: expected 'module:function' or 'path.py:function'.")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ValueError(f"reward {spec!r}: file not found: {path}")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_name = f"sparsejax_user_reward_{digest}"
        try:
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module
            module_spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(module_name, None)
            raise ValueError(f"reward {spec!r}: cannot load {path}: {type(err).__name__}: {err}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise ValueError(f"reward {spec!r}: cannot import module {target!r}: "
                             f"{type(err).__name__}: {err}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"reward {spec!r}: {target} has no attribute {name!r}.")
    _check_signature(fn, spec)
    return fn


def get_reward(name: str) -> Callable[..., list[float]]:
    """A built-in reward by name, or a user function by ``module:function`` / ``path.py:function``.

    Raises:
        ValueError: (one line) for an unknown name or a function that cannot be loaded.
        ImportError: (one line) for ``math`` without math-verify installed.
    """
    if name in REWARDS:
        if name == "math":
            require_math_verify()
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: expected one of {', '.join(REWARDS)}, "
                         "'module:function' or 'path.py:function'.")
    return load_reward_function(name)


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """``"math"`` -> ``("math", 1.0)``; ``"format=0.1"`` -> ``("format", 0.1)``; one-line error if bad."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec {spec!r}: expected NAME or NAME=WEIGHT.")
    name, sep, weight = spec.strip().rpartition("=")
    if not sep:
        return spec.strip(), 1.0
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"reward spec {spec!r}: weight {weight!r} is not a number.") from None
    if not math.isfinite(value):
        raise ValueError(f"reward spec {spec!r}: weight must be finite, got {weight!r}.")
    if not name.strip():
        raise ValueError(f"reward spec {spec!r}: missing reward name before '='.")
    return name.strip(), value


def _call_checked(fn: Callable, name: str, completions: Sequence[Any], answers: Sequence[Any],
                  kwargs: dict) -> list[float]:
    n = check_batch(completions, answers, name)
    values = call_reward(fn, completions, answers, kwargs, name=name)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"reward {name!r} must return a list of floats, got {type(values).__name__}.") from None
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions.")
    if any(math.isinf(v) for v in values):
        raise ValueError(f"reward {name!r} returned an infinite value.")
    return values


class CombinedReward:
    """``sum_i weight_i * reward_i(completions, answers, **kwargs)``, each reward's output checked.

    Keyword arguments (``prompts``, ``completion_ids``, data columns) go to each term as far
    as its signature takes them (:func:`sparsejax.rewards.arguments.call_reward`): all with
    ``**kwargs``, else the named ones; a term that names one not given is a one-line error.
    ``last_means`` holds each component's mean over the last batch (unweighted), for logging
    (``reward/<name>`` metrics). A ``nan`` in any component makes that completion's total ``nan``.
    """

    def __init__(self, components: Sequence[tuple[str, Callable[..., list[float]], float]]):
        if not components:
            raise ValueError("combine_rewards: no rewards given.")
        names = [name for name, _, _ in components]
        if len(set(names)) != len(names):
            raise ValueError(f"combine_rewards: reward names repeat: {names}.")
        self.components = list(components)
        self.last_means: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.components]

    def check_arguments(self, available: Sequence[str]) -> None:
        """One-line ``ValueError`` if a term needs a keyword (column) not in ``available``."""
        for name, fn, _ in self.components:
            check_reward_arguments(fn, available, name)

    def __call__(self, completions: Sequence[Any], answers: Sequence[Any], /, **kwargs: Any) -> list[float]:
        total = [0.0] * check_batch(completions, answers, "combined")
        means = {}
        for name, fn, weight in self.components:
            values = _call_checked(fn, name, completions, answers, kwargs)
            total = [t + weight * v for t, v in zip(total, values, strict=True)]
            finite = [v for v in values if not math.isnan(v)]
            means[name] = sum(finite) / len(finite) if finite else float("nan")
        self.last_means = means
        return total


def combine_rewards(rewards: Sequence[tuple[str | Callable[..., list[float]], float]]) -> CombinedReward:
    """A weighted sum of rewards given as ``(name_or_function, weight)`` pairs.

    ``combine_rewards([("math", 1.0), ("format", 0.1)])``; names go through :func:`get_reward`.
    """
    components = []
    for reward, weight in rewards:
        if isinstance(reward, str):
            name, fn = reward, get_reward(reward)
        else:
            _check_signature(reward, getattr(reward, "__name__", repr(reward)))
            name, fn = getattr(reward, "__name__", f"reward{len(components)}"), reward
        if not math.isfinite(float(weight)):
            raise ValueError(f"reward {name!r}: weight must be finite, got {weight!r}.")
        components.append((name, fn, float(weight)))
    return CombinedReward(components)


def reward_from_specs(specs: str | Sequence[str]) -> CombinedReward:
    """The reward of ``--reward`` values: ``"math"``, ``["math", "format=0.1"]``, ``"gsm8k,format=0.1"``.

    A single string is split on commas. Every spec is ``NAME[=WEIGHT]`` (see the module doc);
    all are resolved now, so a bad one fails before any training starts.
    """
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    if not specs:
        raise ValueError("--reward: no reward given.")
    return combine_rewards([parse_reward_spec(s) for s in specs])
