"""Results tables of an ablation directory, built from every finished run under it.

A finished run is ``DIR/<cell>/seed<k>/eval/<split>/metrics.json``. ``write_results`` writes
``DIR/results.csv`` (one row per run) and ``DIR/results.md`` (one row per cell): the number of
seeds ``n``, each metric's mean (``mean ± std`` only when n > 1, so one seed never reads as zero
variance) printed with the digits that suit it, the best cell per column in bold by the
metric's direction, and a line naming the metrics that no run has and why.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

# Columns of results.md, in order, with their decimals and direction (+1 higher is better,
# -1 lower is better, 0 no better end: e.g. the mean output length).
TABLE_METRICS: dict[str, tuple[int, int]] = {
    "bleu1": (2, +1),
    "bleu4": (2, +1),
    "rouge_1_f_score": (2, +1),
    "rouge_2_f_score": (2, +1),
    "rouge_l_f_score": (2, +1),
    "usr": (3, +1),
    "fmr": (3, +1),
    "fcr": (3, +1),
    "div": (3, -1),
    "perplexity": (2, -1),
    "rmse": (3, -1),
    "mae": (3, -1),
    "mean_length": (1, 0),
    "repeat3_share": (3, -1),
}
LOWER_IS_BETTER = {m for m, (_, direction) in TABLE_METRICS.items() if direction < 0}
# Why a metric can be missing from every run.
ABSENT_BECAUSE = {
    "fmr": "the data has no feature words",
    "fcr": "the data has no feature words",
    "div": "the data has no feature words",
    "rmse": "no run predicts ratings",
    "mae": "no run predicts ratings",
}


def finished_runs(workdir: Path, split: str) -> list[dict[str, Any]]:
    """``{"cell", "seed", **metrics}`` for every evaluated run under ``workdir``."""
    rows = []
    for path in sorted(Path(workdir).glob(f"*/seed*/eval/{split}/metrics.json")):
        rundir = path.parents[2]
        seed = rundir.name.removeprefix("seed")
        if not seed.isdigit():
            continue
        metrics = json.loads(path.read_text())
        rows.append({"cell": rundir.parent.name, "seed": int(seed), **metrics})
    return rows


def write_results(workdir: Path, split: str, cell_order: list[str] = ()) -> list[dict]:
    """Write results.csv and results.md from every finished run; cells of ``cell_order`` first."""
    workdir = Path(workdir)
    rank = {cell: i for i, cell in enumerate(cell_order)}
    rows = sorted(
        finished_runs(workdir, split),
        key=lambda r: (rank.get(r["cell"], len(rank)), r["cell"], r["seed"]),
    )
    columns = ["cell", "seed", *sorted({k for r in rows for k in r} - {"cell", "seed"})]
    with (workdir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (workdir / "results.md").write_text(results_markdown(rows))
    return rows


def format_value(metric: str, values: list[float]) -> str:
    digits = TABLE_METRICS.get(metric, (2, 0))[0]
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per cell: n seeds, then each metric; the best mean per column in bold."""
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    metrics = [m for m in TABLE_METRICS if any(m in r for r in rows)]
    values = {
        (cell, m): [float(r[m]) for r in rows if r["cell"] == cell and m in r]
        for cell in cells
        for m in metrics
    }
    best = {}
    for m in metrics:
        digits, direction = TABLE_METRICS[m]
        means = {c: round(statistics.fmean(v), digits) for c in cells if (v := values[c, m])}
        if direction and len(means) > 1:
            target = (max if direction > 0 else min)(means.values())
            best[m] = {c for c, mean in means.items() if mean == target}
    lines = [
        "| cell | n | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for cell in cells:
        shown = []
        for m in metrics:
            text = format_value(m, values[cell, m]) if values[cell, m] else "–"
            shown.append(f"**{text}**" if cell in best.get(m, ()) else text)
        n = len({r["seed"] for r in rows if r["cell"] == cell})
        lines.append(f"| {cell} | {n} | " + " | ".join(shown) + " |")
    notes = ["", "n: seeds per cell; mean ± std over seeds when n > 1. Bold: best per column"]
    lowered = [m for m in metrics if m in LOWER_IS_BETTER]
    notes[-1] += f" (lower is better for {', '.join(lowered)})." if lowered else "."
    absent = [m for m in TABLE_METRICS if m not in metrics]
    if absent:
        reasons: dict[str, list[str]] = {}
        for m in absent:
            reasons.setdefault(ABSENT_BECAUSE.get(m, "no run computed it"), []).append(m)
        notes.append(
            "Absent: " + "; ".join(f"{', '.join(ms)} ({why})" for why, ms in reasons.items()) + "."
        )
    if not rows:
        return "No finished runs yet.\n"
    return "\n".join(lines + notes) + "\n"
