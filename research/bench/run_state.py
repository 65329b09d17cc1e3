"""What the measurements of one ``research bench`` run share, computed once: the setup, the
matrix-product peak the MFU figures divide by, and the results of fresh child processes (the
compile and memory measurements)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research.bench import reference
from research.bench.common import Setup, card_peak_flops, interleaved


class Run:
    """One benchmark run: its setup, and what several measurements share (computed once)."""

    def __init__(self, setup: Setup, weights_dtypes: tuple[str, ...]):
        self.setup = setup
        self.weights_dtypes = weights_dtypes  # the generate rows' decoding weights
        self.device = jax.devices()[0]
        self.reference_device = reference.device_for(self.device.platform)
        # What a child process is told of the setup: ours reads its name, the reference
        # (no JAX, so no config classes) its plain-data view.
        reference_spec = {"setup": dataclasses.asdict(reference.ReferenceSetup.of(setup))}
        self._child_setup = {
            "ours": setup.name,
            "reference": json.dumps(reference_spec | {"device": self.reference_device}),
        }
        self._peaks: dict[str, dict[str, Any]] = {}  # by dtype
        self._children: dict[tuple[str, str], dict[str, Any]] = {}

    def sample_peak(self, dtypes: tuple[str, ...] | None = None) -> None:
        """One more trial of the matrix-product peak in ``dtypes``, by default the setup's and
        every dtype sampled before; ``run_bench`` takes one before every measurement and one
        at the end, so a busy moment cannot set the peak on its own."""
        for dtype in dtypes or dict.fromkeys((self.setup.dtype, *self._peaks)):
            trial = matmul_peak(self.setup, dtype, self.reference_device)
            peak = self._peaks.setdefault(dtype, {**trial, "trials": 0})
            for side in ("jax", "torch"):
                if trial[side] and trial[side] > (peak[side] or 0.0):
                    peak[side] = trial[side]
            peak["trials"] += 1

    def peak(self, dtype: str) -> dict[str, Any]:
        """FLOP/s the MFU figures of a ``dtype`` row divide by: the card's datasheet peak on a
        known GPU, else the best of ``jnp.dot`` and ``torch.mm`` on square matrices of that
        dtype over the run's trials."""
        if dtype not in self._peaks:
            self.sample_peak((dtype,))
        card = card_peak_flops(self.device.device_kind) if self.device.platform == "gpu" else None
        peak = self._peaks[dtype]
        measured = [v for v in (peak["jax"], peak["torch"]) if v]
        return {
            **peak,
            "used": card or max(measured),
            "source": "datasheet" if card else "measured matmul",
        }

    def child(self, side: str, job: str) -> dict[str, Any]:
        """Results of ``python -m research.bench child SIDE JOB SETUP``, once per (side, job).

        Real runs give every job a fresh process of its own, one after another. The smoke run
        (its timings mean nothing, and the test suite waits for it) starts one process per
        side for both jobs, the two sides at once.
        """
        if (side, job) not in self._children:
            if self.setup.name == "smoke":
                sides = ["ours"] + (["reference"] if self.reference_device is not None else [])
                wanted = [(s, ("train", "generate")) for s in sides]
            else:
                wanted = [(side, (job,))]
            self._children |= run_children(wanted, self._child_setup)
        return self._children[side, job]


def matmul_peak(setup: Setup, dtype: str, torch_device: str | None) -> dict[str, Any]:
    import torch

    n = {"smoke": 256, "gpu": 8192}.get(setup.name, 2048)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    ja, jb = (jnp.asarray(x, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32) for x in (a, b))
    dot = jax.jit(jnp.dot)
    runs = {"jax": lambda: dot(ja, jb).block_until_ready()}
    if torch_device is not None:
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        ta, tb = (torch.as_tensor(x, device=torch_device).to(tdtype) for x in (a, b))

        def torch_mm():
            torch.mm(ta, tb)
            if torch_device == "cuda":
                torch.cuda.synchronize()

        runs["torch"] = torch_mm
    times = interleaved(runs, warmup=2, repeats=7)
    flops = 2.0 * n**3
    return {  # the fastest repeat: a peak, not a typical speed
        "n": n,
        "dtype": dtype,
        "jax": flops / min(times["jax"]),
        "torch": flops / min(times["torch"]) if "torch" in times else None,
    }


# --- Fresh processes for compile and memory ------------------------------------------------------


def run_children(
    wanted: list[tuple[str, tuple[str, ...]]], setup_by_side: dict[str, str]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Run ``python -m research.bench child SIDE JOBS SETUP`` for every (side, jobs) at once
    -> results by (side, job)."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    started = []
    for side, jobs in wanted:
        jobs_arg = ",".join(jobs)
        cmd = [sys.executable, "-m", "research.bench", "child", side, jobs_arg, setup_by_side[side]]
        pipe = subprocess.PIPE
        started.append(
            (side, cmd, subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, env=env))
        )
    results = {}
    for side, cmd, proc in started:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(
                f"benchmark child {' '.join(cmd[2:])} failed (exit {proc.returncode}):\n"
                + stderr[-3000:]
            )
        for job, result in json.loads(stdout.strip().splitlines()[-1]).items():
            results[side, job] = result
    return results
