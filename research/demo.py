"""``make demo``: the embedded default experiment, end to end, in a few minutes on a CPU.

Builds the synthetic corpus, trains ``none`` (plain GPT-2, the baseline that cannot see the
user or item) and ``prefix`` (a frozen all-MiniLM-L6-v2 reads the user's and the item's other
reviews; an MLP turns it into a soft prompt) with a small GPT-2 decoder, evaluates both, and
prints the metric table and a few generated reviews beside their references. Both also
predict the rating with PEPLER's matrix factorisation (``model.rating_head=mf``: a user and an
item table, no encoder, so the head costs the steps almost nothing); the table's RMSE/MAE
sit beside the text metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections

from research.config import default_config
from research.eval.ablate import grid_runs
from research.eval.evaluate import evaluate_run
from research.eval.tables import write_results
from research.train.loop import train

METHODS = ("none", "prefix")


def demo_config() -> ml_collections.ConfigDict:
    cfg = default_config()
    cfg.data.encoder_input = "user_item_history"
    # One padded shape per side: one compilation per step function.
    cfg.data.target_buckets = (22,)
    cfg.data.encoder_buckets = (128,)
    cfg.model.conditioning = "prefix"
    cfg.model.rating_head = "mf"
    cfg.train.rating_weight = 1.0  # PEPLER's 0.01 barely moves the tables in 150 steps
    cfg.train.trainable = ("decoder", "conditioning")  # MiniLM frozen: cheaper steps
    cfg.train.steps = 150
    cfg.train.batch_size = 32
    cfg.train.learning_rate = 2e-3
    cfg.train.warmup_steps = 20
    cfg.train.eval_every = 75
    cfg.train.checkpoint_every = 75
    cfg.train.max_eval_batches = 2
    cfg.train.log_every = 10
    cfg.eval.max_examples = 128
    return cfg


def run_demo(workdir: str | Path = "runs/demo", overrides=()) -> None:
    workdir = Path(workdir)
    grid = {"axes": {"model.conditioning": list(METHODS)}, "seeds": [0]}
    runs = grid_runs(demo_config(), grid, overrides)
    started = time.perf_counter()
    for i, (cell, seed, cfg) in enumerate(runs, 1):
        rundir = workdir / cell / f"seed{seed}"
        if (rundir / "eval" / "test" / "metrics.json").exists():
            print(f"[{i}/{len(runs)}] {cell}: already done in {rundir}")
            continue
        print(f"\n[{i}/{len(runs)}] training '{cell}' in {rundir}")
        train(cfg, rundir, ["research", "demo", "--workdir", str(workdir)])
        print(f"[{i}/{len(runs)}] evaluating '{cell}' on the test split")
        evaluate_run(rundir, "test")
    write_results(workdir, "test", list(METHODS))
    print("\nTest-split metrics (PEPLER-compatible BLEU/ROUGE x100):\n")
    print((workdir / "results.md").read_text())
    print(side_by_side(workdir, count=5))
    minutes = (time.perf_counter() - started) / 60
    print(f"Done in {minutes:.1f} min. Results: {workdir}/results.md, {workdir}/results.csv,")
    print(f"per-run logs and samples under {workdir}/<method>/seed0/.")
    print(
        "Explore them in notebooks/explore_results.ipynb "
        f"(set RESULTS_DIR = '{workdir.resolve()}')."
    )


def side_by_side(workdir: Path, count: int = 5) -> str:
    """A few test examples: the reference and what each method wrote."""
    samples = {}
    for method in METHODS:
        path = workdir / method / "seed0" / "eval" / "test" / "samples.jsonl"
        samples[method] = [json.loads(line) for line in path.read_text().splitlines()[:count]]
    lines = ["Generated reviews (test split):"]
    for i, row in enumerate(samples[METHODS[0]]):
        lines.append(f"\n  user {row['user']}, item {row['item']}")
        lines.append(f"    reference : {row['reference']}")
        for method in METHODS:
            lines.append(f"    {method:<10}: {samples[method][i]['generated']}")
    return "\n".join(lines) + "\n"
