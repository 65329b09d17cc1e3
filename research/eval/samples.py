"""Generated reviews side by side: the same test examples, every method of an ablation.

``DIR/<cell>/seed<k>/eval/<split>/samples.jsonl`` holds what ``research evaluate`` generated
for each example of a run. :func:`samples_markdown` picks ``n`` examples that every cell of
seed ``seed`` generated for (drawn with ``draw_seed``, so the page is the same each time) and
shows, per example, the user and item ids, the reference and each cell's text::

    research samples --workdir runs/ablation_amazon_mi --n 10 --out samples.md
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from research.config import ConfigError


def cell_samples(workdir: Path, split: str, seed: int) -> dict[str, dict[int, dict[str, Any]]]:
    """``{cell: {example index: samples.jsonl row}}`` of every cell's run of ``seed``."""
    cells = {}
    for path in sorted(Path(workdir).glob(f"*/seed{seed}/eval/{split}/samples.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        cells[path.parents[3].name] = {row["example"]: row for row in rows}
    return cells


def _cell_text(text: str) -> str:
    """One markdown table cell: no line breaks, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|") or "(empty)"


def samples_markdown(
    workdir: str | Path,
    n: int = 10,
    split: str = "test",
    seed: int = 0,
    draw_seed: int = 0,
    cell_order: list[str] = (),
) -> str:
    """Markdown of ``n`` examples (fewer when fewer are shared), each method's text in a row.

    Cells of ``cell_order`` come first, the others in name order. Raises FileNotFoundError
    when no run of ``seed`` has samples.
    """
    if n < 1:
        raise ConfigError(f"--n {n}: ask for at least one example")
    found = cell_samples(Path(workdir), split, seed)
    if not found:
        raise FileNotFoundError(
            f"no {workdir}/<cell>/seed{seed}/eval/{split}/samples.jsonl: "
            f"run `research evaluate` (or `research ablate`) first"
        )
    cells = [c for c in cell_order if c in found] + sorted(set(found) - set(cell_order))
    shared = sorted(set.intersection(*(set(found[c]) for c in cells)))
    rng = np.random.default_rng(draw_seed)
    chosen = sorted(rng.choice(shared, size=min(n, len(shared)), replace=False).tolist())
    lines = [
        f"# Samples: {len(chosen)} {split} examples, seed {seed}",
        "",
        f"Drawn with seed {draw_seed} from the {len(shared)} examples every method generated "
        f"for; one row per method ({', '.join(cells)}). Written by `research samples`.",
    ]
    for example in chosen:
        first = found[cells[0]][example]
        lines += [
            "",
            f"## Example {example}: user `{first['user']}`, item `{first['item']}`",
            "",
            "| | text |",
            "|---|---|",
            f"| reference | {_cell_text(first['reference'])} |",
        ]
        lines += [f"| {cell} | {_cell_text(found[cell][example]['generated'])} |" for cell in cells]
    return "\n".join(lines) + "\n"


def write_samples(workdir: str | Path, out: str | Path | None = None, **options: Any) -> Path:
    """Write :func:`samples_markdown` to ``out`` (default ``workdir/samples.md``), the cells
    in the order of ``workdir/results.csv`` (the grid's, as in results.md) when it exists."""
    out = Path(out) if out else Path(workdir) / "samples.md"
    results = Path(workdir) / "results.csv"
    if results.exists() and "cell_order" not in options:
        with results.open(newline="") as f:
            options["cell_order"] = list(dict.fromkeys(row["cell"] for row in csv.DictReader(f)))
    out.write_text(samples_markdown(workdir, **options))
    return out
