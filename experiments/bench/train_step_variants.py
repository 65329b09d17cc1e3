"""Our GPT-2 124M train step (the bench's ``cpu`` shapes, no PyTorch in the process) with
malloc's huge pages (research/allocator.py) or glibc's defaults; one JSON line per run.

    RESEARCH_MALLOC=hugepages|default python experiments/bench/train_step_variants.py \\
        [--update-only] [--steps 5] >> FILE.jsonl

(Other malloc settings: ``RESEARCH_MALLOC=default`` plus glibc's own ``MALLOC_*`` variables.)

``--update-only`` trains on one row of 8 tokens: the update over all 124M parameters is the
same, the forward and backward passes shrink, so the update is most of the step.

Each configuration needs a fresh process (glibc reads its settings at start-up).
Reports seconds per step (after two untimed steps), minor page faults per step
(``getrusage``) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

from research.allocator import restart_with_hugepages

restart_with_hugepages()  # first thing, as the `research` command does

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from research.bench import ours  # noqa: E402
from research.bench.batches import lm_batch  # noqa: E402
from research.bench.common import environment, make_setup, now  # noqa: E402
from research.models.generator import GROUPS  # noqa: E402
from research.train.optim import make_optimizer, trainable_labels  # noqa: E402
from research.train.steps import init_state, make_train_step, replicate, shard  # noqa: E402


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn, steps: int) -> tuple[list[float], list[int]]:
    for _ in range(2):
        jax.block_until_ready(fn())
    seconds, faults = [], []
    for _ in range(steps):
        start, before = time.perf_counter(), _faults()
        jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
        faults.append(_faults() - before)
    return seconds, faults


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--update-only", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    setup = make_setup("cpu")
    model = ours.lm_model(setup)
    params = ours.random_params(model)
    schedule = optax.constant_schedule(1e-4)
    tx = make_optimizer(params, GROUPS, schedule)
    labels = trainable_labels(params, GROUPS)
    # --update-only: one row of 8 tokens, so the forward and backward passes are small and
    # the update (over all 124M parameters, the same as for the full batch) is most of it.
    rows, seq = (1, 8) if args.update_only else (setup.batch, setup.seq)
    batch = shard(lm_batch(np.random.default_rng(0), rows, seq, setup.decoder.vocab_size), 1, 1)
    step = make_train_step(model, tx, labels, schedule)
    holder = {"state": replicate(init_state(params, tx), 1)}
    key = replicate(jax.random.key(0), 1)
    del params

    def run():
        holder["state"], metrics = step(holder["state"], batch, key)
        return metrics["loss"]

    seconds, faults = _timed(run, args.steps)
    print(
        json.dumps(
            {
                "measurement": "update_alone" if args.update_only else "train_step",
                "malloc": os.environ.get("RESEARCH_MALLOC", "hugepages"),
                "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                "median_s": statistics.median(seconds),
                "seconds": seconds,
                "minor_faults_per_step": statistics.median(faults),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "shapes": {"batch": rows, "seq": seq},
                "date": now(),
                "load_average": os.getloadavg()[0],
                **environment(),
            }
        )
    )


if __name__ == "__main__":
    main()
