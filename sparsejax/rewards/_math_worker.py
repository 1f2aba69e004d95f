"""Worker process of the ``math`` reward: checks (prediction, gold) pairs with math-verify.

Run as a script (``python _math_worker.py MEMORY_LIMIT_MB``), never imported by the library, so
that it starts without importing jax or sparsejax. Protocol, one JSON object per line: it writes
``{"ready": true}`` (or ``{"error": "..."}``) once math-verify is imported, then answers each
request ``{"pred": str, "gold": str}`` with ``{"score": 0.0 | 1.0}``. math-verify's own
timeouts are disabled (they use ``signal.alarm``); the parent process bounds the time of each
request by killing this process.
"""

import json
import logging
import sys


def _limit_memory(megabytes: int) -> None:
    if megabytes > 0:
        try:
            import resource

            limit = megabytes * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass


def main() -> None:
    _limit_memory(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    logging.disable(logging.WARNING)  # math-verify warns that its timeouts are disabled
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except Exception as err:
        print(json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
        return
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            gold = parse("\\boxed{" + request["gold"] + "}", extraction_config=config, parsing_timeout=None)
            pred = parse("\\boxed{" + request["pred"] + "}", extraction_config=config, parsing_timeout=None)
            score = 1.0 if gold and pred and verify(gold, pred, timeout_seconds=None) else 0.0
        except Exception:
            score = 0.0
        print(json.dumps({"score": score}), flush=True)


if __name__ == "__main__":
    main()
