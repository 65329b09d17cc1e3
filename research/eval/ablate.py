"""Ablation runner: a grid of settings x seeds, each trained and evaluated in its own workdir.

An ablation config file has ``get_config()`` (the base experiment) and ``get_grid()``::

    def get_grid():
        return {
            "axes": {"model.conditioning": ["none", "prefix"], "data.encoder_input": [...]},
            "seeds": [0, 1],
        }

Each cell (one value per axis) and seed runs in ``DIR/<cell>/seed<k>/`` (the cell name joins
the values, e.g. ``prefix`` or ``prefix__user_history``). A run whose
``eval/<split>/metrics.json`` exists is skipped, so rerunning finishes an interrupted ablation.
``DIR/results.csv`` has one row per run; ``DIR/results.md`` the mean +- std per cell with the
best value per column in bold.
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import ml_collections

from research.config import ConfigError, apply_override, load_config_file, validate
from research.eval.evaluate import MAIN_METRICS, evaluate_run
from research.train.loop import train

# Metrics where lower is better (bold marks the minimum).
LOWER_IS_BETTER = {"perplexity", "div"}
TABLE_METRICS = (*MAIN_METRICS, "fmr", "fcr", "div", "perplexity")


def load_grid(path: str | Path) -> dict[str, Any]:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"research_grid_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_grid"):
        raise ConfigError(f"{path} defines no get_grid(); an ablation config needs one")
    grid = module.get_grid()
    if not grid.get("axes") or not grid.get("seeds"):
        raise ConfigError(f"{path}: get_grid() must return non-empty 'axes' and 'seeds'")
    return grid


def cell_name(values: dict[str, Any]) -> str:
    return "__".join(str(v).replace("/", "-") for v in values.values())


def grid_runs(
    base: ml_collections.ConfigDict, grid: dict[str, Any], overrides=()
) -> list[tuple[str, int, ml_collections.ConfigDict]]:
    """Every (cell name, seed, validated config) of the grid; errors before anything runs."""
    axes = grid["axes"]
    runs = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        for seed in grid["seeds"]:
            cfg = ml_collections.ConfigDict(base.to_dict())
            for key, value in (*((k, str(v)) for k, v in values.items()), *overrides):
                apply_override(cfg, key, value)
            cfg.seed = int(seed)
            validate(cfg)
            runs.append((cell_name(values), int(seed), cfg))
    return runs


def run_ablation(config_path: str | Path, workdir: str | Path, overrides=()) -> Path:
    """Train and evaluate every grid run not yet finished; write the result tables."""
    base, grid = load_config_file(config_path), load_grid(config_path)
    workdir = Path(workdir)
    runs = grid_runs(base, grid, overrides)
    split = base.eval.split
    for i, (cell, seed, cfg) in enumerate(runs, 1):
        rundir = workdir / cell / f"seed{seed}"
        if (rundir / "eval" / split / "metrics.json").exists():
            print(f"[{i}/{len(runs)}] {cell} seed {seed}: done, skipped")
            continue
        print(f"[{i}/{len(runs)}] {cell} seed {seed}: training in {rundir}")
        command = ["research", "ablate", "--config", str(config_path), "--workdir", str(workdir)]
        train(cfg, rundir, command)
        evaluate_run(rundir, split)
    write_results(workdir, [(cell, seed) for cell, seed, _ in runs], split)
    print(f"Results: {workdir / 'results.md'} and {workdir / 'results.csv'}")
    return workdir


def write_results(workdir: Path, runs: list[tuple[str, int]], split: str) -> None:
    rows = []
    for cell, seed in runs:
        metrics = json.loads(
            (workdir / cell / f"seed{seed}" / "eval" / split / "metrics.json").read_text()
        )
        rows.append({"cell": cell, "seed": seed, **metrics})
    columns = ["cell", "seed", *sorted({k for r in rows for k in r} - {"cell", "seed"})]
    with (workdir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (workdir / "results.md").write_text(results_markdown(rows))


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """Mean +- std per cell (over seeds); the best cell per column in bold."""
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    metrics = [m for m in TABLE_METRICS if all(m in r for r in rows)]
    stats = {}
    for cell in cells:
        for metric in metrics:
            values = [float(r[metric]) for r in rows if r["cell"] == cell]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            stats[cell, metric] = (statistics.fmean(values), std, len(values))
    best = {}
    for metric in metrics:
        pick = min if metric in LOWER_IS_BETTER else max
        best[metric] = pick(cells, key=lambda c, m=metric: stats[c, m][0])
    lines = [
        "| cell | seeds | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for cell in cells:
        values = []
        for metric in metrics:
            mean, std, _ = stats[cell, metric]
            text = f"{mean:.2f} ± {std:.2f}"
            values.append(f"**{text}**" if best[metric] == cell else text)
        seeds = stats[cell, metrics[0]][2] if metrics else 0
        lines.append(f"| {cell} | {seeds} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"
