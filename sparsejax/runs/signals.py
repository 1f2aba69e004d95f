"""Clean stops on SIGINT / SIGTERM: finish the step, checkpoint, say one line.

:func:`install` (called by the experiment scripts) routes both signals here. Inside
:func:`deferred` (a trainer's step loop) a first signal only records the request;
the loop calls :func:`check` at its safe point (after a step and its checkpoint),
which saves what the caller asks and raises :class:`Interrupted`. Outside the loop,
or at a second signal, :class:`Interrupted` is raised at once: every file a run
writes is written atomically (or, for ``metrics.jsonl``, as whole lines), so nothing
half-written is left either way. Library users who never call :func:`install` keep
Python's default behaviour.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """The run was stopped by ``signum`` after ``step`` completed steps."""

    def __init__(self, signum: int, step: int | None):
        super().__init__(signum, step)
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)

    def message(self) -> str:
        where = "" if self.step is None else f" at step {self.step}"
        return f"interrupted{where}; resume with --resume"


_state = {"defer": 0, "signum": None, "step": None}


def _handler(signum, frame):
    if _state["defer"] and _state["signum"] is None:
        _state["signum"] = signum
        return
    raise Interrupted(signum, _state["step"])


def install() -> None:
    """Routes SIGINT and SIGTERM to this module (main thread only)."""
    for sig in EXIT_CODES:
        signal.signal(sig, _handler)


def note_step(step: int) -> None:
    """Records the number of completed steps (named in the interruption message)."""
    _state["step"] = int(step)


def requested() -> int | None:
    return _state["signum"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within: a first signal waits for :func:`check` instead of interrupting."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1


def check(step: int, on_stop: Callable[[], None] | None = None) -> None:
    """At a safe point: if a stop was requested, run ``on_stop`` and raise
    :class:`Interrupted`."""
    note_step(step)
    signum = _state["signum"]
    if signum is None:
        return
    if on_stop is not None:
        on_stop()
    _state["signum"] = None
    raise Interrupted(signum, step)
