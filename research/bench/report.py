"""The bench's targets (the issue's figures) and its Markdown table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def target_for(
    setup: str, measurement: str, case: str
) -> tuple[str, Callable[[dict], bool]] | None:
    """The issue's target for a row of a ``cpu``/``gpu`` run: (text, check), or None. A
    ``NAME_bf16`` row (bfloat16 against autocast) has the target of ``NAME``."""
    measurement = measurement.removesuffix("_bf16")
    if setup == "cpu":
        if measurement == "train_lm":
            return ">= 1.25x", lambda r: r["ratio"] is not None and r["ratio"] >= 1.25
        # Issue 19: float32 against float32, bfloat16 weights against bfloat16 weights.
        batch = case.split(",")[0]
        if measurement == "generate" and batch == "batch 1":
            return ">= 1.5x", lambda r: r["ratio"] is not None and r["ratio"] >= 1.5
        if measurement == "generate" and batch == "batch 16":
            return ">= 2x", lambda r: r["ratio"] is not None and r["ratio"] >= 2.0
        if measurement == "memory":  # issue 19: training peak at most PyTorch's
            return "<= 1x", lambda r: r["ratio"] is not None and r["ratio"] <= 1.0
    if setup in ("cpu", "gpu") and measurement == "train_frozen_encoder":
        least = 3.0 if case.startswith("prefix") else 2.0
        return f">= {least:g}x", lambda r: r["ratio"] is not None and r["ratio"] >= least
    if setup in ("cpu", "gpu") and measurement == "loop_overhead":
        return ">= 0.95", lambda r: r["ratio"] >= 0.95
    if setup in ("cpu", "gpu") and measurement == "compile" and "warm" in case:
        return "< 3 s", lambda r: r["ours"] < 3.0
    if setup in ("cpu", "gpu") and measurement == "compile":
        return "< 10 s", lambda r: r["ours"] < 10.0
    if setup in ("cpu", "gpu") and measurement == "memory_lora":
        most = 0.35 if "full fine-tuning" in case else 1.0
        return f"<= {most:g}x", lambda r: r["ratio"] is not None and r["ratio"] <= most
    if setup in ("cpu", "gpu") and measurement == "train_lora":
        return ">= 1x", lambda r: r["ratio"] is not None and r["ratio"] >= 1.0
    if setup == "gpu" and measurement == "train_lm":
        return "MFU >= 40%", lambda r: r["mfu"]["ours"] >= 0.40
    return None


# --- Output ---------------------------------------------------------------------------------


def _value(row: dict[str, Any], side: str) -> str:
    value = row[side]
    if value is None:
        return "n/a"
    text = f"{value:,.1f} {row['unit']}" if value >= 10 else f"{value:.2f} {row['unit']}"
    mfu = row.get("mfu", {}).get(side)
    if mfu is not None and not row["mfu_valid"][side]:
        return f"{text} (MFU invalid peak)"
    return f"{text} (MFU {100 * mfu:.0f}%)" if mfu is not None else text


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with the run's machine and date above it."""
    if not rows:
        return "(no measurements)"
    first = rows[0]
    machine, device, versions = first["machine"], first["device"], first["versions"]
    features = ", ".join(machine.get("cpu_features") or [])  # absent in older JSON lines
    cpu = f"{machine['cpu']} ({features})" if features else machine["cpu"]
    lines = [
        f"{first['date']}, setup `{first['setup']}` ({first['dtype']}), {cpu}, "
        f"{machine['usable_cores']} cores, {device['count']} x {device['kind']} "
        f"({device['platform']}); jax {versions['jax']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}",
        "",
        "| measurement | case | ours | transformers (PyTorch) | ours / PyTorch | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "n/a"
        met = {True: "yes", False: "**no**", None: ""}[row["meets_target"]]
        lines.append(
            f"| {row['measurement']} | {row['case']} | {_value(row, 'ours')} | "
            f"{_value(row, 'reference')} | {ratio} | {row['target'] or ''} | {met} |"
        )
    with_mfu = [r for r in rows if "peak_flops" in r]
    if with_mfu:
        formulas = "; ".join(f"{r['measurement']}: {r['flops_formula']}" for r in with_mfu)
        # One peak per dtype (the bf16 rows of a float32 run have their own).
        peaks = {r["dtype"]: r["peak_flops"] for r in with_mfu}
        peak_text = ", ".join(f"{p / 1e9:,.0f} GFLOP/s in {d}" for d, p in peaks.items())
        lines += [
            "",
            f"MFU: model FLOPs per second / {peak_text} "
            f"({with_mfu[0]['peak_source']}). Model FLOPs, {formulas}.",
        ]
    load = [r["load_average"] for r in rows]
    lines.append(f"Load average (1 min) during the rows: {', '.join(f'{x:.1f}' for x in load)}.")
    return "\n".join(lines)
