"""The ``math`` reward: math-verify equivalence in worker processes, bounded per completion."""

from __future__ import annotations

import importlib.util
import threading
import time

import pytest

from sparsejax.rewards import MathVerifier, get_reward, math_reward

pytest.importorskip("math_verify")

_HANG = "9^{9^{9^{9}}}"  # sympy evaluates the power and never returns


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout_s=2.0, num_workers=2)
    yield v
    v.close()


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac12}", "0.5", 1.0),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
        ("\\boxed{\\frac{\\sqrt2}{2}}", "\\sqrt{2}/2", 1.0),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("\\boxed{2x+1}", "1+2x", 1.0),
        ("\\boxed{[1,2)}", "[1, 2)", 1.0),
        ("\\boxed{(1,2]}", "[1,2)", 0.0),
        ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
        ("\\boxed{\\pi}", "3.14159", 0.0),
        ("\\boxed{3}", "4", 0.0),
        ("\\boxed{-4}", "4", 0.0),
        ("\\boxed{\\text{(C)}}", "C", 1.0),
        ("\\boxed{1,000}", "1000", 1.0),
        ("the answer is 72", "72", 1.0),  # fast path, numeric
        ("16 - 3 - 4", "-4", 0.0),
        ("no answer here", "\\frac{1}{2}", 0.0),
        ("\\boxed{}", "1", 0.0),
        # a MATH solution as the gold: its last \boxed{} is the answer
        ("\\boxed{\\frac{3}{4}}", "We add ... so the result is $\\boxed{\\dfrac{3}{4}}$.", 1.0),
        ("\\boxed{\\frac{3}{4}}", "Natalia ... #### 0.75", 1.0),
    ],
)
def test_math_equivalences(verifier, completion, gold, expected):
    assert verifier([completion], [gold]) == [expected]


def test_batch_mixes_fast_path_and_workers(verifier):
    completions = ["\\boxed{0.5}", "\\boxed{72}", "nothing", "\\boxed{x+1}",
                   [{"role": "assistant", "content": "\\boxed{1/2}"}]]
    answers = ["\\frac12", "72.0", "3", "1+x", "0.5"]
    assert verifier(completions, answers) == [1.0, 1.0, 0.0, 1.0, 1.0]


def test_a_hanging_comparison_is_cut_at_the_timeout(verifier):
    before = verifier.timeouts
    start = time.perf_counter()
    scores = verifier([f"\\boxed{{{_HANG}}}", "\\boxed{0.5}", "\\boxed{y^2}"], ["7", "\\frac{1}{2}", "y^{2}"])
    elapsed = time.perf_counter() - start
    assert scores == [0.0, 1.0, 1.0]
    assert verifier.timeouts == before + 1
    assert elapsed < 2.0 + 15.0  # the timeout, plus a worker restart on a busy 2-core machine
    # the replaced worker answers the next batch
    assert verifier(["\\boxed{\\frac{2}{4}}"], ["0.5"]) == [1.0]


def test_works_from_threads(verifier):
    # math-verify's own timeouts use signal.alarm, which fails off the main thread; ours do not,
    # and concurrent calls queue on the verifier's lock.
    results = {}

    def score(i):
        results[i] = verifier([f"\\boxed{{\\frac{{{i}}}{{2}}}}", "\\boxed{x}"], [str(i / 2), "y"])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {1: [1.0, 0.0], 2: [1.0, 0.0], 3: [1.0, 0.0]}


def test_errors(verifier, monkeypatch):
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        verifier(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
    assert math_reward(["\\boxed{2}"], ["2"]) == [1.0]  # the shared default verifier

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "math_verify" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match=r'pip install -e "\.\[math\]"'):
        get_reward("math")
    with pytest.raises(ImportError, match="math-verify"):
        MathVerifier()(["\\boxed{x+1}"], ["1+x"])


def test_fast_path_does_not_read_expressions_as_numbers(verifier):
    # parse_number's embedded-number rule reads "x+1" as 1; the math reward must not.
    assert verifier(["\\boxed{x+1}", "\\boxed{x+1}"], ["1", "1+x"]) == [0.0, 1.0]


def test_a_dead_worker_is_replaced(verifier):
    verifier(["\\boxed{x+2}"], ["2+x"])  # workers are up
    for worker in verifier._workers:
        worker.proc.kill()
        worker.proc.wait()
    assert verifier(["\\boxed{x+2}", "\\boxed{2x}"], ["2+x", "x+x"]) == [1.0, 1.0]
