"""Console output that reads well both on a terminal and in a log file.

* ``progress_bar``: a tqdm bar on a terminal; when stderr is not one (a log file, a pipe, a
  batch job), a plain line every ``every`` steps and one at the end, never a carriage return.
* ``track``: the same around an iterable.
* ``compile_log``: one line per XLA compilation (the function's name and how long it took),
  from JAX's monitoring events, while the context is active.
"""

from __future__ import annotations

import contextlib
import linecache
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

import jax
from tqdm.auto import tqdm

# JAX's event for one backend compilation (jax._src.dispatch.BACKEND_COMPILE_EVENT).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class PlainProgress:
    """tqdm's update / set_postfix / write / close, printed as plain lines to ``stream``."""

    def __init__(self, total, desc: str, unit: str, initial: int, every: int, stream: TextIO):
        self.total, self.desc, self.unit, self.every = total, desc, unit, max(1, every)
        self.n, self.start_n, self.stream = initial, initial, stream
        self.started = time.perf_counter()
        self.postfix: dict[str, str] = {}
        self.printed_at: int | None = None

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(
            f"{self.desc}: {self.unit} {done}{percent}, {elapsed:.1f} s, "
            f"{rate:.2f} {self.unit}/s{extra}",
            file=self.stream,
            flush=True,
        )
        self.printed_at = self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or (self.total and self.n >= self.total):
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}

    def write(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.printed_at != self.n and self.n != self.start_n:
            self._line()


def progress_bar(
    total: int | None,
    desc: str,
    unit: str,
    initial: int = 0,
    disable: bool = False,
    every: int = 10,
    stream: TextIO | None = None,
):
    """A tqdm bar on a terminal, else :class:`PlainProgress` (a line every ``every`` steps)."""
    stream = stream or sys.stderr
    if disable or stream.isatty():
        return tqdm(
            total=total, initial=initial, disable=disable, desc=desc, unit=unit, file=stream
        )
    return PlainProgress(total, desc, unit, initial, every, stream)


def track(iterable: Iterable, total: int | None, desc: str, unit: str, every: int = 10):
    """Yield from ``iterable`` with a :func:`progress_bar` counting the items."""
    bar = progress_bar(total, desc, unit, every=every)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _caller() -> str:
    """Where in this package the compiling call was made: jax.pmap names every pmapped
    function jit(_fun), so the calling line is what says which step it is."""
    package = Path(__file__).parent
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(package) and path != Path(__file__):
            line = linecache.getline(str(path), frame.f_lineno).strip()
            return f" for `{line}` ({path.relative_to(package.parent)}:{frame.f_lineno})"
        frame = frame.f_back
    return ""


@contextlib.contextmanager
def compile_log(min_seconds: float = 0.5, write: Callable[[str], None] = tqdm.write):
    """Print "compiled NAME in X s" for each compilation of at least ``min_seconds``.

    Shorter ones (a replicated constant, a random split) would bury the step functions.
    """

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT and duration >= min_seconds:
            name = kwargs.get("fun_name", "?")
            write(f"compiled {name}{_caller()} in {duration:.1f} s")

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
