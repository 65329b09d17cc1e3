"""Writing a file so that no reader ever sees half of it, with an ordinary new file's mode."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` writes the content to the path ``tmp`` beside ``path``; it then replaces
    ``path`` in one rename. A crash, or a concurrent reader or writer, never sees a partial
    file; the file gets the mode ``open()`` would give it (0o666 less the umask), not the
    private mode of a temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp (and safetensors) create files private (0o600).
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    umask = os.umask(0o077)
    os.umask(umask)
    return umask
