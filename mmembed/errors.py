"""One-line errors for the command-line tools: what went wrong and the fix, no traceback unless asked for.

``mmembed-eval`` and ``python -m mmembed.mining.cli`` run their work through :func:`run_cli` (``--debug`` re-raises
with the full traceback); ``experiments/run.py`` does the same under Hydra (``HYDRA_FULL_ERROR=1``).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable

#: Errors that mean "the input or the setup is wrong" (bad path, bad value, unreachable server, missing extra,
#: checkpoint that does not fit, out of memory). Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError, ImportError,
                                                pickle.UnpicklingError)  # a checkpoint a weights-only load refuses


def one_line(exn: BaseException, limit: int = 400) -> str:
    """The exception's message on one line (its first line, cut to ``limit`` characters), else its type."""
    text = str(exn).strip()
    first = text.splitlines()[0] if text else type(exn).__name__
    return first if len(first) <= limit else first[: limit - 1] + "…"


def run_cli(work: Callable[[], int], *, prog: str, debug: bool = False, hint: str = "--debug") -> int:
    """Run a command's work; a :data:`USER_ERRORS` exception becomes one line on stderr and exit status 2.

    Args:
        work: The command body; returns the exit status.
        prog: The command's name, the prefix of the error line.
        debug: Re-raise instead (full traceback).
        hint: How to get the traceback, named in the error line.
    """
    try:
        return work()
    except USER_ERRORS as exn:
        if debug:
            raise
        print(f"{prog}: error: {one_line(exn)} ({hint} shows the traceback)", file=sys.stderr)
        return 2
