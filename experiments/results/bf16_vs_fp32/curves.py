"""The bf16_vs_fp32 runs' training and validation losses side by side: curves.csv, curves.png.

    python experiments/results/bf16_vs_fp32/curves.py runs/bf16_vs_fp32

reads RUNS/float32 and RUNS/bfloat16 (``research train`` workdirs of
experiments/configs/bf16_vs_fp32.py) and writes beside this file.
"""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from research.train.run_log import read_metrics  # noqa: E402

DTYPES = ("float32", "bfloat16")
HERE = Path(__file__).parent


def main(runs: str) -> None:
    rows = {dtype: read_metrics(Path(runs) / dtype) for dtype in DTYPES}
    by_step = {}
    for dtype, metrics in rows.items():
        for row in metrics:
            by_step.setdefault((row["split"], row["step"]), {})[dtype] = row["loss"]
    with open(HERE / "curves.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["split", "step", *(f"loss_{d}" for d in DTYPES), "bf16_minus_fp32"])
        for (split, step), loss in sorted(by_step.items()):
            if len(loss) == len(DTYPES):
                diff = loss["bfloat16"] - loss["float32"]
                out.writerow([split, step, *(f"{loss[d]:.5f}" for d in DTYPES), f"{diff:+.5f}"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for split, ax in zip(("train", "validation"), axes, strict=True):
        for dtype in DTYPES:
            points = [(r["step"], r["loss"]) for r in rows[dtype] if r["split"] == split]
            ax.plot(*zip(*points, strict=True), label=dtype, marker="." if split != "train" else "")
        ax.set(title=f"{split} loss", xlabel="step", ylabel="loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=100)


if __name__ == "__main__":
    main(sys.argv[1])
