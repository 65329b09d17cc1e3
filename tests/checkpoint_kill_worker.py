"""Subprocess for the kill test: resume from a workdir, verify, then save checkpoints in a loop.

    python -m tests.checkpoint_kill_worker WORKDIR

Each run opens a fresh ``Checkpointer`` and prints ``opening``, restores the newest intact step
(moving damaged newer ones aside, as the train loop does), restores every step on disk and
checks it bitwise against ``expected_state(step)`` (exit code 1 on a mismatch), prints
``restored <latest>`` (or ``restored none``), then saves steps latest+1, latest+2, ... printing ``saving <step>`` before and
``saved <step> <seconds>`` after each save, until the parent test kills it with SIGKILL (or after
``MAX_SAVES``, should the parent be gone).
"""

from __future__ import annotations

import sys
import time

import jax
import ml_dtypes
import numpy as np

from research.train.checkpoint import Checkpointer
from research.train.checkpoint_damage import restore_newest

KEEP_LAST = 2
MAX_SAVES = 100
BIG = 6_000_000  # float32 elements: 24 MB, so a save takes a measurable fraction of a second


def _bits(count: int, step: int, salt: int) -> np.ndarray:
    """``[count]`` uint32 that differ at every index and step (a multiplicative hash)."""
    index = np.arange(count, dtype=np.uint32)
    return index * np.uint32(2654435761) + np.uint32(step * 40503 + salt)


def expected_state(step: int) -> dict:
    """The state saved at ``step``: arbitrary bit patterns (NaN payloads included), ~26 MB."""
    return {
        "params": {
            "big": _bits(BIG, step, 1).view(np.float32),
            "half": (_bits(300_000, step, 2) >> 16).astype(np.uint16).view(ml_dtypes.bfloat16),
        },
        "opt": (_bits(1000, step, 3).view(np.float32), [np.int32(step)]),
        "rng": _bits(2, step, 4),
        "step": np.int32(step),
    }


def expected_meta(step: int) -> dict:
    return {"data_position": 7 * step, "stage": "train", "seen": [step, step + 1]}


def expected_val_loss(step: int) -> float | None:
    """Some steps have no loss; the loss moves up and down so the best step changes."""
    return None if step % 3 == 0 else float((step * 7) % 5 + step / 100)


def assert_bitwise_equal(restored, expected, what: str) -> None:
    restored_leaves, restored_tree = jax.tree.flatten(restored)
    expected_leaves, expected_tree = jax.tree.flatten(expected)
    assert restored_tree == expected_tree, f"{what}: tree {restored_tree} != {expected_tree}"
    for got, want in zip(restored_leaves, expected_leaves, strict=True):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}"
        assert got.tobytes() == want.tobytes(), f"{what}: bytes differ"


def verify_all_steps(ckpt: Checkpointer) -> None:
    """Restore every step on disk and compare it bitwise with what was saved at that step."""
    for step in ckpt.all_steps():
        state, meta = ckpt.restore(step, target=expected_state(step))
        assert_bitwise_equal(state, expected_state(step), f"step {step}")
        assert meta == expected_meta(step), f"step {step}: meta {meta}"


def main() -> int:
    ckpt = Checkpointer(sys.argv[1], keep_last=KEEP_LAST)
    print("opening", flush=True)
    restore_newest(ckpt, lambda meta: expected_state(meta["data_position"] // 7))
    verify_all_steps(ckpt)
    latest = ckpt.latest_step()
    print(f"restored {latest if latest is not None else 'none'}", flush=True)
    first = 1 if latest is None else latest + 1
    for step in range(first, first + MAX_SAVES):
        state = expected_state(step)
        print(f"saving {step}", flush=True)
        start = time.perf_counter()
        assert ckpt.save(step, state, expected_meta(step), val_loss=expected_val_loss(step))
        print(f"saved {step} {time.perf_counter() - start:.3f}", flush=True)
    ckpt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
