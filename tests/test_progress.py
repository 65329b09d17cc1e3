"""Console output in a log file: plain progress lines, and one line per compilation."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp

from research.progress import compile_log, progress_bar, track


def test_progress_in_a_log_file_is_plain_lines_every_n_steps():
    log = io.StringIO()  # not a terminal
    bar = progress_bar(25, "train", "step", every=10, stream=log)
    for step in range(1, 26):
        bar.set_postfix(loss=f"{1 / step:.3f}")
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(",")[0] for line in lines] == [
        "train: step 10/25 (40%)",
        "train: step 20/25 (80%)",
        "train: step 25/25 (100%)",  # once, although close() follows the last update
    ]
    assert lines[-1].endswith("loss=0.040")


def test_progress_of_an_iterable_prints_its_end_once():
    log = io.StringIO()
    import research.progress as progress

    original = progress.progress_bar
    progress.progress_bar = lambda *a, **k: original(*a, **k, stream=log)
    try:
        assert list(track(range(3), 3, "generate", "batch", every=2)) == [0, 1, 2]
    finally:
        progress.progress_bar = original
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        "generate: batch 2/3 (67%)",
        "generate: batch 3/3 (100%)",
    ]


def test_one_line_per_compilation_with_its_name():
    lines = []

    def doubled_plus_one(x):
        return x * 2 + 1

    with compile_log(min_seconds=0.0, write=lines.append):
        jax.jit(doubled_plus_one)(jnp.arange(3.0)).block_until_ready()
    jax.jit(doubled_plus_one)(jnp.arange(4.0)).block_until_ready()  # after the context
    assert len([line for line in lines if "doubled_plus_one" in line]) == 1, lines
    assert all(line.startswith("compiled ") and line.endswith(" s") for line in lines)


def test_a_compilation_names_the_calling_line_of_the_package():
    from research.train import steps

    lines = []
    with compile_log(min_seconds=0.0, write=lines.append):
        # A shape no other test uses: compiled here, not found in the in-memory cache.
        steps.replicate(jnp.zeros((17, 3), jnp.int8), jax.local_device_count())
    assert any("(research/train/steps.py:" in line for line in lines), lines
