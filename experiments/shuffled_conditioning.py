"""Does a conditioned run use its conditioning? Test perplexity (and RMSE) with shuffled inputs.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 .venv/bin/python \
        experiments/shuffled_conditioning.py WORKDIR OUT.json [PERMUTATIONS]

Scores the run's evaluation sample of the test split as ``research evaluate`` does (same
checkpoint, perplexity, clamped RMSE/MAE), first as is, then PERMUTATIONS times (default 3)
with every example given another example's conditioning inputs (user and item ids, encoder
input or its cached features) and its own target and rating; permutation ``s`` is a seeded
single cycle of the whole split, so no example keeps its own. A run that reads example-specific
information scores worse shuffled, by more than the spread between permutations; one that
learned a constant (or ``none``, which reads nothing) scores the same. Prints and writes JSON.
"""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from research.eval.evaluate import (
    LoadedRun,
    eval_examples,
    load_run,
    predicted_ratings,
    split_perplexity,
)
from research.eval.pepler_compat import rating_errors

SPLIT = "test"


def derangement(size: int, seed: int) -> np.ndarray:
    """int [size]: a seeded single cycle, so ``out[i] != i`` (for size > 1)."""
    order = np.random.default_rng(seed).permutation(size)
    out = np.empty(size, np.int64)
    out[order] = np.roll(order, -1)
    return out


def scores(run: LoadedRun) -> dict[str, float]:
    """Perplexity, and RMSE/MAE when the split has ratings, of the run's evaluation sample."""
    max_examples = run.cfg.eval.max_examples
    out = {"perplexity": split_perplexity(run, SPLIT, max_examples)}
    if run.dataset.rating_range is not None:
        examples = eval_examples(run, SPLIT, max_examples)
        rows = np.arange(len(run.dataset.splits[SPLIT])) if examples is None else examples
        true = run.dataset.splits[SPLIT].rating[rows]
        predicted = predicted_ratings(run, SPLIT, examples)[rows]
        rated = np.isfinite(true)
        out.update(rating_errors(true[rated], predicted[rated], *run.dataset.rating_range))
    return out


def shuffled_conditioning(workdir: str, permutations: int = 3) -> dict:
    """``{"as_is": scores, "shuffled": [scores per permutation seed], ...}`` for ``workdir``."""
    run = load_run(workdir)
    size = len(run.dataset.splits[SPLIT])
    as_is = scores(run)
    shuffled = [
        scores(dataclasses.replace(run, conditioning_of={SPLIT: derangement(size, seed)}))
        for seed in range(permutations)
    ]
    return {
        "workdir": str(workdir),
        "conditioning": run.cfg.model.conditioning,
        "checkpoint_step": run.step,
        "as_is": as_is,
        "shuffled": shuffled,
    }


def main(workdir: str, out: str, permutations: str = "3") -> None:
    result = shuffled_conditioning(workdir, int(permutations))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
