"""How a command ends: one line and an exit status, never a traceback for bad input.

Exit statuses: 0 done (or nothing to do), 1 a run error (lock held, disk full, no intact
checkpoint), 2 bad input (flags, files, a resume with changed settings), 130 SIGINT,
143 SIGTERM (``interrupted at step N; resume with --resume``). Standard library only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_OK, EXIT_RUN_ERROR, EXIT_BAD_INPUT = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # sparsejax.runs.signals.EXIT_CODES


def first_line(e: BaseException | str) -> str:
    """The first line of an error's message (its type's name if it has none)."""
    text = str(e).strip()
    if text:
        return text.splitlines()[0]
    return type(e).__name__ if isinstance(e, BaseException) else text


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Exits with status ``code`` (2: bad input) and a one-line message (no traceback)."""
    print(f"error: {first_line(str(message)) or message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run_main(main: Callable[[], int]) -> None:
    """Runs a command's ``main`` and exits: 0 done, 1 a run error (disk full, lock held,
    no intact checkpoint: one line), 2 bad input, 130/143 SIGINT/SIGTERM ("interrupted
    at step N; resume with --resume"). After a stop or a run error the process exits
    at once (``os._exit``), so no background writer thread prints on the way out.
    Imports nothing heavy itself (the run folder's opening installs the signal handlers)."""
    try:
        code = main()
    except KeyboardInterrupt as e:  # also sparsejax.runs.signals.Interrupted
        code = getattr(e, "exit_code", EXIT_SIGINT)
        print(e.message() if hasattr(e, "message") else "interrupted; resume with --resume",
              file=sys.stderr)
    except Exception as e:
        run_dir = sys.modules.get("sparsejax.runs.run_dir")
        if run_dir is None or not isinstance(e, run_dir.RunError):
            raise
        code = EXIT_RUN_ERROR
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    else:
        # The run is done (its outputs are on disk): a signal during the interpreter's
        # shutdown must not turn a finished run into a failed one.
        import signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
