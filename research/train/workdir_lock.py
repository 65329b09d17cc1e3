"""One trainer per workdir: an advisory OS lock held for the life of ``research train``.

The lock is ``fcntl.flock`` on ``WORKDIR/train.lock``. The kernel releases it when its file
descriptor closes, which every exit does (return, exception, SIGKILL, a crashed host's NFS lease
running out), so a lock is never stale: the file left behind only names the last holder. A
second trainer on the same workdir gets :class:`WorkdirBusy` at once, naming the holder's PID and
host, instead of writing every metrics row and checkpoint a second time.

``locked_update`` serialises the short read-modify-write of ``run.json``, which evaluation may
append to while a trainer runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

from research.errors import ExpectedError

LOCK_NAME = "train.lock"


class WorkdirBusy(ExpectedError):
    """Another process holds the workdir's trainer lock; the message names its PID and host."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "a process that has not written its name yet"


@contextlib.contextmanager
def trainer_lock(workdir: Path) -> Iterator[None]:
    """Hold ``workdir``'s trainer lock while the ``with`` body runs, or raise WorkdirBusy."""
    path = workdir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirBusy(
                f"{workdir} is already being trained by {_holder(path)} (lock {path}); "
                "one trainer per workdir: wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.write(fd, f"pid {os.getpid()} on host {platform.node()} since {started}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def locked_update(path: Path) -> Iterator[None]:
    """Block until no other process updates ``path`` (a sibling ``.NAME.lock`` file)."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
