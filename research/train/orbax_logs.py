"""Orbax's log noise around a failed save or restore, cut down to the one line that matters.

A failed write is reported once, by :class:`research.train.checkpoint.CheckpointWriteFailed`;
without these filters Orbax's worker threads and tensorstore's completions repeat it as
tracebacks (absl warnings, unraisable "Event loop is closed" errors) that bury that line.
"""

from __future__ import annotations

import contextlib
import logging
import sys


@contextlib.contextmanager
def absl_quiet():
    """Only absl errors while inside (Orbax warns of what we asked for, e.g. read-only)."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


class _ThreadEcho(logging.Filter):
    """Orbax's worker threads log the error a failed save raises anyway, with its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised an exception" not in record.getMessage()


@contextlib.contextmanager
def without_thread_echoes():
    absl, echo = logging.getLogger("absl"), _ThreadEcho()
    absl.addFilter(echo)
    try:
        yield
    finally:
        absl.removeFilter(echo)


def silence_closed_loop_echoes() -> None:
    """Drop the "Event loop is closed" echoes of a failed restore or save (once per process).

    After one read or write fails, Orbax closes its event loop while tensorstore still
    completes the others; each completion then reports ``RuntimeError: Event loop is closed``
    as an unraisable exception, a traceback per array that buries the one line naming the
    failure. Other unraisable exceptions still reach the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_echoes", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_echoes = True
    sys.unraisablehook = hook
