"""Resuming past damaged checkpoint steps: fall back to the newest step that restores.

:func:`restore_newest` tries steps from the newest down. A step that fails to restore (a
truncated or missing file, in any item) is named in one line and renamed into
``checkpoints/corrupt/<step>`` (kept, never deleted; an atomic rename, so a kill leaves it either
in place or moved) once an older step has restored, so retention only ever counts intact steps.
When no step restores, nothing is moved and :class:`NoIntactCheckpoint` says so. A
:class:`~research.train.checkpoint.CheckpointMismatch` (a config change) is not damage.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import jax

from research.errors import ExpectedError
from research.train.checkpoint import META_ITEM, Checkpointer, CheckpointMismatch, first_line

# Steps that failed to restore are renamed here and kept.
CORRUPT_SUBDIR = "corrupt"


class NoIntactCheckpoint(ExpectedError, RuntimeError):
    """Checkpoints exist but none of them restores; the message lists each step's error."""


def restore_newest(
    checkpoints: Checkpointer, target_for: Callable[[dict[str, Any]], Any]
) -> tuple[int, Any, dict[str, Any]] | None:
    """``(step, state, meta)`` of the newest step that restores, or None without steps.

    ``target_for(meta)`` gives the target of a step from its meta. Steps newer than the one
    restored that failed are moved to ``checkpoints/corrupt/<step>``, each named in one line
    on stderr (process 0). A :class:`CheckpointMismatch` is not damage and is raised.

    Raises:
      NoIntactCheckpoint: there are steps but none restores (nothing is moved).
    """
    failures = []
    for step in reversed(checkpoints.all_steps()):
        step_dir = checkpoints.directory / str(step)
        meta_file = step_dir / META_ITEM / "metadata"
        try:
            meta = checkpoints.restore_meta(step)
            meta_file = None  # read: a later error is in the arrays
            state, meta = checkpoints.restore(step, target=target_for(meta))
        except CheckpointMismatch:
            raise
        except Exception as error:  # any damage: truncated, missing or garbled files
            reason = first_line(error)
            if meta_file is not None and str(meta_file) not in reason:
                reason = f"{meta_file}: {reason}"  # JSON errors name no file
            failures.append((step, reason))
            if jax.process_index() == 0:
                print(
                    f"warning: checkpoint {step_dir} does not restore "
                    f"({failures[-1][1]}); trying the step before it",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        for bad, _ in failures:
            _move_aside(checkpoints, bad)
        return step, state, meta
    if failures:
        listed = "; ".join(f"step {step}: {reason}" for step, reason in failures)
        raise NoIntactCheckpoint(
            f"no checkpoint in {checkpoints.directory} restores ({listed}); nothing was moved or "
            "deleted: repair them or start in a new workdir"
        )
    return None


def _move_aside(checkpoints: Checkpointer, step: int) -> None:
    """Rename a damaged step into ``CORRUPT_SUBDIR`` (process 0), keeping any earlier one."""
    if jax.process_index() == 0:
        corrupt = checkpoints.directory / CORRUPT_SUBDIR
        corrupt.mkdir(exist_ok=True)
        name, copy = str(step), 1
        while (corrupt / name).exists():
            copy += 1
            name = f"{step}-{copy}"
        os.rename(checkpoints.directory / str(step), corrupt / name)
        print(
            f"warning: moved the damaged checkpoint of step {step} to {corrupt / name}",
            file=sys.stderr,
            flush=True,
        )
    # Orbax caches the steps it found; make it forget this one.
    checkpoints.reload()
