"""Ablation runner: a grid of settings x seeds, each trained and evaluated in its own workdir.

An ablation config file has ``get_config()`` (the base experiment) and may have ``get_grid()``::

    def get_grid():
        return {
            "axes": {"model.conditioning": ["none", "prefix"], "data.encoder_input": [...]},
            "seeds": [0, 1],
        }

The command line changes the grid without a new file: ``--seeds 0,1,2`` replaces the seeds,
``--axis KEY=v1,v2`` replaces (or adds) one axis, ``--config.KEY=VALUE`` overrides the base.
A run's config is what ``research train`` builds from the file with the overrides, the cell's
values and ``seed`` (tokenizers follow ``init.*`` folders the same way).
Each cell (one value per axis) and seed runs in ``DIR/<cell>/seed<k>/`` (the cell name joins
the values, e.g. ``prefix`` or ``prefix__user_history``; ``base`` when there are no axes). A
run whose ``eval/<split>/metrics.json`` exists is skipped, so only missing cells run, and an
interrupted run resumes. ``--dry-run`` prints that plan and runs nothing. The tables
(``research.eval.tables``) are rebuilt from every finished run under ``DIR``, so adding a seed
to one method keeps the others' rows.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import ml_collections

from research.config import ConfigError, load_config_file, resolve
from research.eval.evaluate import evaluate_run
from research.eval.tables import write_results
from research.train.loop import train


def load_grid(path: str | Path) -> dict[str, Any]:
    """The file's ``get_grid()``, or an empty grid (no axes, seed 0) when it has none."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"research_grid_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grid = module.get_grid() if hasattr(module, "get_grid") else {}
    return {"axes": dict(grid.get("axes", {})), "seeds": list(grid.get("seeds", [0]))}


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers separated by commas") from None
    if not seeds:
        raise ConfigError("--seeds is empty; e.g. --seeds 0,1,2")
    return seeds


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``"model.conditioning=none,prefix"`` -> ``("model.conditioning", ["none", "prefix"])``."""
    key, sep, values = text.partition("=")
    choices = [v for v in values.split(",") if v]
    if not sep or not key or not choices:
        raise ConfigError(f"--axis {text!r}: write --axis KEY=VALUE1,VALUE2")
    return key.removeprefix("config."), choices


def command_grid(
    config_path: str | Path, seeds: str | None = None, axes: list[str] = ()
) -> dict[str, Any]:
    """The file's grid with the command line's ``--seeds`` and ``--axis`` applied."""
    grid = load_grid(config_path)
    if seeds is not None:
        grid["seeds"] = parse_seeds(seeds)
    for text in axes:
        key, values = parse_axis(text)
        grid["axes"][key] = values
    return grid


def cell_name(values: dict[str, Any]) -> str:
    return "__".join(str(v).replace("/", "-") for v in values.values()) or "base"


def grid_runs(
    base: ml_collections.ConfigDict, grid: dict[str, Any], overrides=()
) -> list[tuple[str, int, ml_collections.ConfigDict]]:
    """Every (cell name, seed, validated config) of the grid; errors before anything runs."""
    axes = grid["axes"]
    runs = []
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        for seed in grid["seeds"]:
            cell = [*overrides, *((k, str(v)) for k, v in values.items()), ("seed", str(seed))]
            cfg = resolve(ml_collections.ConfigDict(base.to_dict()), cell)
            runs.append((cell_name(values), int(seed), cfg))
    return runs


def run_status(rundir: Path, split: str) -> str:
    if (rundir / "eval" / split / "metrics.json").exists():
        return "done"
    if (rundir / "checkpoints").is_dir() and any((rundir / "checkpoints").iterdir()):
        return "to resume"
    return "to run"


def run_ablation(
    config_path: str | Path,
    workdir: str | Path,
    overrides=(),
    seeds: str | None = None,
    axes: list[str] = (),
    dry_run: bool = False,
    command: list[str] | None = None,
) -> Path:
    """Train and evaluate every grid run not yet finished; write the result tables."""
    base, grid = load_config_file(config_path), command_grid(config_path, seeds, axes)
    workdir = Path(workdir)
    runs = grid_runs(base, grid, overrides)
    split = base.eval.split
    statuses = [run_status(workdir / cell / f"seed{seed}", split) for cell, seed, _ in runs]
    missing = sum(s != "done" for s in statuses)
    axes_text = ", ".join(f"{k} in {v}" for k, v in grid["axes"].items()) or "no axes"
    print(f"Grid: {axes_text}; seeds {grid['seeds']}: {len(runs)} runs, {missing} to run.")
    command = command or [
        "research",
        "ablate",
        "--config",
        str(config_path),
        "--workdir",
        str(workdir),
    ]
    for i, ((cell, seed, cfg), status) in enumerate(zip(runs, statuses, strict=True), 1):
        rundir = workdir / cell / f"seed{seed}"
        if dry_run or status == "done":
            print(
                f"[{i}/{len(runs)}] {cell} seed {seed}: {status}" + ("" if dry_run else ", skipped")
            )
            continue
        print(f"[{i}/{len(runs)}] {cell} seed {seed}: training in {rundir}")
        train(cfg, rundir, command)
        evaluate_run(rundir, split)
    if dry_run:
        return workdir
    write_results(workdir, split, list(dict.fromkeys(cell for cell, _, _ in runs)))
    print(f"Results: {workdir / 'results.md'} and {workdir / 'results.csv'}")
    return workdir
