"""Fresh-process halves of ``compile`` and ``memory``: ``python -m research.bench child SIDE SETUP``.

SIDE is ``ours`` or ``reference``. The child trains GPT-2 (first step, then a few more), reads
its peak resident memory, then decodes greedily twice; it prints one JSON line. A fresh
process is what a user starts: nothing compiled or cached yet.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from research.bench import ours, reference
from research.bench.common import Setup, make_setup


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's ``VmHWM`` first: ``ru_maxrss`` survives
    ``exec``, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _first_and_next(fn: Callable[[], Any], steps: int, shapes: dict[str, Any]) -> dict[str, Any]:
    first = _timed(fn)
    following = [_timed(fn) for _ in range(steps)]
    return {
        "first_result_s": first,
        "next_call_s": float(np.median(following)),
        "steps": 1 + steps,
        "shapes": shapes,
    }


def child(side: str, setup: Setup) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    batch = ours.lm_batch(setup, rng)
    prompt = rng.integers(0, setup.decoder.vocab_size - 1, (1, setup.prompt), dtype=np.int32)
    train_shapes = {"batch": setup.batch, "seq": setup.seq}
    generate_shapes = {"batch": 1, "prompt": setup.prompt, "new_tokens": setup.new_tokens}
    if side == "ours":
        model = ours.lm_model(setup)
        params = ours.random_params(model)
        step: Callable[[], Any] = ours.TrainStep(model, params, batch)
        decode = ours.greedy(ours.lm_model(setup, decoding=True), params, prompt, setup.new_tokens)
    else:
        device = reference.device_for(setup)
        torch_model = reference.lm_model(setup)
        step = reference.TrainStep(torch_model, batch, setup, device)
        decode = reference.greedy(torch_model, prompt, setup.new_tokens, setup, device)
    train = _first_and_next(step, setup.memory_steps, train_shapes)
    train["peak_rss_mib"] = _peak_rss_mib()
    stats = jax.devices()[0].memory_stats() if side == "ours" else None
    if stats and "peak_bytes_in_use" in stats:
        train["device_peak_bytes"] = stats["peak_bytes_in_use"]
    del step
    return {"train": train, "generate": _first_and_next(decode, 1, generate_shapes)}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "child" or argv[1] not in ("ours", "reference"):
        print("usage: python -m research.bench child {ours,reference} SETUP", file=sys.stderr)
        return 2
    import transformers

    transformers.logging.set_verbosity_error()
    print(json.dumps(child(argv[1], make_setup(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
