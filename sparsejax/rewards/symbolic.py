"""The ``math`` reward: LaTeX / expression equivalence with the ``math-verify`` package.

``math-verify`` (what TRL's ``accuracy_reward`` and open-r1 use) parses both answers to sympy
and compares them: ``\\frac{1}{2} == 0.5``, ``(3, \\frac{\\pi}{2}) == \\left( 3, \\frac{\\pi}{2}
\\right)``, ``x^2+2x+1 == (x+1)^2``, ``[1,2) != (1,2]``. It is an optional dependency:
``pip install -e ".[math]"``.

Time bound without signals. math-verify bounds its own time with ``signal.alarm``, which only
works in the main thread of the main interpreter (a trainer that scores in a thread would fail
or hang). Here its timeouts are switched off and the time is bounded from outside instead:

* bounded input: only the extracted answers are compared (the prediction's last ``\\boxed{}``,
  else its ``####`` / "answer is" / last number; the gold's last ``\\boxed{}`` if it has one),
  each at most ``max_answer_chars`` long, found in linear time;
* fast path in-process: pairs decided without sympy (no answer: 0; equal after whitespace
  removal or equal as exact numbers: 1) never leave the process;
* worker processes: the rest go to ``num_workers`` long-lived subprocesses (plain scripts that
  import only math-verify, not jax); a pair that takes longer than ``timeout_s`` scores 0 and
  its worker is killed and replaced (``9^{9^{9^{9}}}`` hangs sympy; it costs ``timeout_s`` plus
  a worker restart of about a second). Workers also run under an address-space limit.

Measured on the shared 2-core CPU machine: two workers start in ~2 s (importing sympy, once
per process); 512 completions with random fractions / linear expressions, half of them equal to
the gold as strings (fast path), took 12.0 s (23 ms a completion; math-verify itself takes
8-240 ms for a pair that reaches sympy); a hanging pair costs ``timeout_s``. More workers help
on more cores (default: ``min(8, cpu_count)``).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsejax.rewards.base import check_batch
from sparsejax.rewards.extract import completion_text, extract_answer, extract_boxed
from sparsejax.rewards.numeric import gold_answer, parse_number

__all__ = ["MathVerifier", "math_reward", "require_math_verify"]

_WORKER = Path(__file__).with_name("_math_worker.py")
_MISSING = "the 'math' reward needs the math-verify package: pip install -e \".[math]\" (or pip install math-verify)"


def require_math_verify() -> None:
    """Raise a one-line ``ImportError`` if ``math-verify`` is not installed."""
    if importlib.util.find_spec("math_verify") is None:
        raise ImportError(_MISSING)


class _Worker:
    """One worker subprocess with a line-based JSON protocol (see ``_math_worker.py``)."""

    def __init__(self, memory_limit_mb: int, start_timeout_s: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(_WORKER), str(memory_limit_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, encoding="utf-8", bufsize=1)
        reply = self.read(start_timeout_s)
        if reply is None or "error" in reply:
            self.kill()
            detail = reply["error"] if reply else f"no reply in {start_timeout_s:.0f} s"
            if reply and "ModuleNotFoundError" in detail:
                raise ImportError(_MISSING)
            raise RuntimeError(f"math reward worker failed to start: {detail}")

    def send(self, pred: str, gold: str) -> None:
        self.proc.stdin.write(json.dumps({"pred": pred, "gold": gold}) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout_s: float) -> dict | None:
        """The next reply, or ``None`` if none came within ``timeout_s`` or the worker died."""
        ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout_s, 0.0))
        if not ready:
            return None
        line = self.proc.stdout.readline()  # one reply per request, written with one flush
        return json.loads(line) if line else None

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass


class MathVerifier:
    """Scores (prediction, gold) answer pairs with math-verify, at most ``timeout_s`` per pair.

    Args:
        timeout_s: the longest a pair may take in a worker; over it, the pair scores 0.
        num_workers: worker processes (started on first use, kept until :meth:`close`).
        max_answer_chars: longer extracted answers score 0 without being parsed.
        memory_limit_mb: address-space limit of each worker (0: none).

    Raises:
        ImportError: (one line) on first use, if math-verify is not installed.
    """

    def __init__(self, *, timeout_s: float = 5.0, num_workers: int | None = None,
                 max_answer_chars: int = 1000, memory_limit_mb: int = 4096):
        if not timeout_s > 0:
            raise ValueError(f"math reward: timeout_s must be > 0, got {timeout_s}.")
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"math reward: num_workers must be >= 1, got {num_workers}.")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers or max(1, min(8, os.cpu_count() or 1))
        self.max_answer_chars = max_answer_chars
        self.memory_limit_mb = memory_limit_mb
        self.timeouts = 0  # pairs that ran out of time, over this verifier's life
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # one batch at a time: calls from several threads queue
        atexit.register(self.close)

    def _fast(self, pred: str | None, gold: str | None) -> float | None:
        if not pred or not gold or len(pred) > self.max_answer_chars or len(gold) > self.max_answer_chars:
            return 0.0
        if "".join(pred.split()) == "".join(gold.split()):
            return 1.0
        a, b = parse_number(pred, embedded=False), parse_number(gold, embedded=False)
        if a is not None and b is not None and a == b:
            return 1.0
        return None

    def score_answers(self, pairs: Sequence[tuple[str | None, str | None]]) -> list[float]:
        """1.0 per (predicted answer, gold answer) pair that math-verify finds equivalent, else 0.0."""
        scores: list[float] = [0.0] * len(pairs)
        pending = []
        for i, (pred, gold) in enumerate(pairs):
            fast = self._fast(pred, gold)
            if fast is None:
                pending.append(i)
            else:
                scores[i] = fast
        if not pending:
            return scores
        require_math_verify()
        with self._lock:
            self._score_in_workers(pairs, pending, scores)
        return scores

    def _score_in_workers(self, pairs: Sequence[tuple[str, str]], pending: list[int], scores: list[float]) -> None:
        while len(self._workers) < min(self.num_workers, len(pending)):
            self._workers.append(_Worker(self.memory_limit_mb, start_timeout_s=60.0))
        idle = list(self._workers)
        busy: dict[int, tuple[_Worker, int, float]] = {}  # fd -> (worker, pair, deadline)
        queue = pending[::-1]
        while queue or busy:
            while idle and queue:
                worker, i = idle.pop(), queue.pop()
                try:
                    worker.send(*pairs[i])
                except OSError:  # the worker died between batches: replace it, retry the pair
                    worker.kill()
                    self._workers.remove(worker)
                    worker = _Worker(self.memory_limit_mb, start_timeout_s=60.0)
                    self._workers.append(worker)
                    worker.send(*pairs[i])
                busy[worker.proc.stdout.fileno()] = (worker, i, time.monotonic() + self.timeout_s)
            wait = max(0.0, min(deadline for _, _, deadline in busy.values()) - time.monotonic())
            ready, _, _ = select.select([w.proc.stdout for w, _, _ in busy.values()], [], [], wait)
            now = time.monotonic()
            for fd, (worker, i, deadline) in list(busy.items()):
                reply = worker.read(0.0) if worker.proc.stdout in ready else None
                if reply is None and worker.proc.stdout not in ready and now < deadline:
                    continue
                del busy[fd]
                if reply is not None:
                    scores[i] = float(reply.get("score", 0.0))
                    idle.append(worker)
                    continue
                # out of time, or the worker died (EOF): score 0, replace the worker
                self.timeouts += worker.proc.poll() is None
                worker.kill()
                self._workers.remove(worker)
                if queue:
                    replacement = _Worker(self.memory_limit_mb, start_timeout_s=60.0)
                    self._workers.append(replacement)
                    idle.append(replacement)

    def __call__(self, completions: Sequence[Any], answers: Sequence[Any], **kwargs: Any) -> list[float]:
        """The ``math`` reward of a batch (see :func:`math_reward`)."""
        check_batch(completions, answers, "math")
        pairs = []
        for completion, gold in zip(completions, answers, strict=True):
            gold = gold_answer(gold)
            if gold is not None:
                boxed = extract_boxed(gold)
                gold = boxed if boxed is not None else gold
            pairs.append((extract_answer(completion_text(completion)), gold))
        return self.score_answers(pairs)

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []


_DEFAULT: MathVerifier | None = None


def math_reward(completions: Sequence[Any], answers: Sequence[Any], **kwargs: Any) -> list[float]:
    """The ``math`` reward: ``1.0`` per completion whose answer math-verify finds equal to its gold.

    The prediction is the completion's last ``\\boxed{}`` (else ``####`` / "answer is" / last
    number); the gold is the answer column, or its last ``\\boxed{}`` when it is a full solution
    (MATH's ``solution`` field). Each pair takes at most 5 s (see :class:`MathVerifier` for
    other limits and for the workers, shared by all calls of this function).

    Raises:
        ValueError: if ``completions`` and ``answers`` are not lists of the same length.
        ImportError: (one line) if math-verify is not installed and a pair needs it.
    """
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = MathVerifier()
    return _DEFAULT(completions, answers, **kwargs)
