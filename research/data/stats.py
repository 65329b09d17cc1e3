"""``research data stats``: what a data config yields, before any training."""

from __future__ import annotations

import ml_collections
import numpy as np

from research.data.pipeline import load_dataset

PERCENTILES = (50, 90, 99)


def _length_line(label: str, lengths: np.ndarray, cap: int, cut_name: str) -> str:
    values = np.percentile(lengths, PERCENTILES).round().astype(int)
    shown = ", ".join(f"p{p} {v}" for p, v in zip(PERCENTILES, values, strict=True))
    share = 100 * float(np.mean(lengths >= cap if cut_name == "at" else lengths > cap))
    return f"{label}: {shown}, max {lengths.max()}; {share:.1f}% {cut_name} {cap}"


def data_stats(data_cfg: ml_collections.ConfigDict) -> str:
    """Users, items, records per split, length percentiles and the bad-row report, as text."""
    dataset = load_dataset(data_cfg)
    cfg, report = dataset.config, dataset.report
    splits = dataset.splits.values()
    where = f" ({', '.join(report['files'])})" if report["files"] else ""
    lines = [
        f"source: {cfg.source}{where}",
        f"users in train: {report['num_users']}, items in train: {report['num_items']}",
        "records: " + ", ".join(f"{s.name} {len(s)}" for s in splits),
        "unseen in train: "
        + ", ".join(
            f"{name} {seen['users']} users/{seen['items']} items"
            for name, seen in report["unseen_in_train"].items()
            if name != "train"
        ),
        _length_line(
            f"target ({cfg.target}) decoder tokens before the cut",
            np.concatenate([s.target_token_counts for s in splits]),
            cfg.max_target_tokens,
            "longer than",
        ),
    ]
    if cfg.encoder_input != "none":
        lines.append(
            _length_line(
                f"encoder input ({cfg.encoder_input}) tokens incl. [CLS]/[SEP]",
                np.concatenate([s.encoder.lengths for s in splits]),
                cfg.max_encoder_tokens,
                "at",
            )
        )
    bad = report["bad_rows"]
    skipped = ", ".join(f"{reason} {n}" for reason, n in bad["skipped"].items()) or "none"
    lines.append(
        f"rows read: {bad['rows_read']}, kept: {bad['rows_kept']}, skipped: {skipped} "
        f"(data.on_bad_row={bad['on_bad_row']})"
    )
    for reason, examples in bad["examples"].items():
        lines.extend(f"  {reason}: {example}" for example in examples)
    dropped = {k: v for k, v in report["dropped_index_entries"].items() if v}
    if dropped:
        lines.append(f"index entries pointing at skipped rows: {dropped}")
    return "\n".join(lines)
