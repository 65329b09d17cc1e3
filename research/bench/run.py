"""``run_bench``: the chosen measurements, their JSON lines and table."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

from research.bench.common import default_setup_name, environment, make_setup, now
from research.bench.measure import MEASURE, MEASUREMENTS, final_mfu
from research.bench.report import markdown_table, target_for
from research.bench.run_state import Run


def run_bench(
    only: list[str] | None = None,
    json_path: str | None = None,
    smoke: bool = False,
    append: bool = False,
    weights_dtypes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the measurements (all, or ``only`` these), write JSON lines to ``json_path`` (after
    the lines it holds if ``append``, else replacing them), print the Markdown table; returns
    the rows. ``weights_dtypes`` limits the generate rows to those decoding weights (default:
    every one of ``sampling.weights_dtype``'s choices)."""
    from research.config import ConfigError
    from research.models.decode_weights import WEIGHTS_DTYPES

    def check_choices(flag: str, given, valid, what: str) -> None:
        unknown = [x for x in given if x not in valid]
        if unknown:
            raise ConfigError(f"bench {flag} {unknown[0]!r}: valid {what} are {list(valid)}")

    names = list(only) if only else list(MEASUREMENTS)
    check_choices("--only", names, MEASUREMENTS, "measurements")
    if append and not json_path:
        raise ConfigError("bench --append adds to a --json FILE: give one")
    weights_dtypes = tuple(dict.fromkeys(weights_dtypes or WEIGHTS_DTYPES))
    check_choices("--weights-dtype", weights_dtypes, WEIGHTS_DTYPES, "dtypes")
    import transformers

    transformers.logging.set_verbosity_error()
    # On a GPU the compile/memory children need device memory too: no process grabs 75% of it
    # up front (this works when nothing has started JAX's backend yet, as under the CLI).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    run = Run(make_setup(default_setup_name(smoke)), weights_dtypes)
    # Rows stream in as they finish (with append, after the file's lines).
    out = open(json_path, "a" if append else "w") if json_path else None  # noqa: SIM115
    start_offset = out.tell() if out is not None else 0  # where this run's lines begin
    rows: list[dict[str, Any]] = []
    try:
        for name in names:
            print(f"[bench] {name} ({run.setup.name}) ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            run.sample_peak()
            for row in MEASURE[name](run):
                row = _complete(row, run)
                rows.append(row)
                if out is not None:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
            gc.collect()
            took = time.perf_counter() - start
            print(f"[bench] {name} took {took:.0f} s", file=sys.stderr, flush=True)
        if any("model_flops_per_step" in row for row in rows):
            run.sample_peak()
            rows = [final_mfu(row, run) for row in rows]
            if out is not None:  # this run's rows again, against the run's best peak
                out.seek(start_offset)
                out.truncate()
                out.writelines(json.dumps(row) + "\n" for row in rows)
    finally:
        if out is not None:
            out.close()
    print(markdown_table(rows))
    return rows


def _complete(row: dict[str, Any], run: Run) -> dict[str, Any]:
    """Add what every JSON line carries, and the target verdict."""
    s = run.setup
    target = target_for(s.name, row["measurement"], row["case"])
    return {
        **row,
        "target": target[0] if target else None,
        "meets_target": target[1](row) if target else None,
        "setup": s.name,
        "dtype": row.get("dtype", s.dtype),  # the bf16 rows of a float32 setup say so
        "attention_impl": s.attention_impl,
        "warmup": s.warmup,
        "repeats": s.repeats,
        "date": now(),
        "load_average": os.getloadavg()[0],
        **environment(),
    }
