"""Entry points of the command-line tools: a failure is one line on stderr naming the problem
(the file, line and field where there is one), not a Python traceback. `ARK_DEBUG=1` shows the
traceback."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def run(main: Callable[[], int]) -> int:
    """`main()`'s exit code; an error prints `error: <message>` and gives 1."""
    try:
        return main()
    except Exception as e:  # KeyboardInterrupt and SystemExit pass through
        if os.environ.get("ARK_DEBUG", "") not in ("", "0"):
            raise
        message = str(e) or type(e).__name__
        if isinstance(e, KeyError) and e.args:  # str(KeyError) quotes its message
            message = str(e.args[0])
        elif isinstance(e, OSError) and e.filename:
            message = f"{e.filename}: {e.strerror}"
        print(f"error: {message} ({type(e).__name__}; ARK_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse names the option on error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value
