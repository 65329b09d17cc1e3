"""The training system end to end: exact resume, signals, kills, devices, hosts, NaN, bad configs.

Every run is the real command, ``python -m research train --config tests/configs/tiny.py
--workdir DIR --config.KEY=VALUE ...``, in a subprocess with 4 (or 1, or 2 per process) CPU
devices. The references are other runs or closed forms, never a run's report of itself:

* an uninterrupted run is the reference of the same command killed (SIGKILL at four moments, two
  of them inside checkpoint saves), stopped (SIGINT, SIGTERM) and rerun: bitwise equal state;
* with dropout off, the 4-device run is the reference of the 1-device run and of gradient
  accumulation (equal up to float rounding: the global batch is only summed in another order);
* the 4-device run is the reference of two processes with 2 devices each (dropout on: the keys
  fold in the global device index, which is the same in both layouts);
* closed forms: the learning-rate schedule, perplexity = exp(loss), frozen groups stay bitwise,
  AdamW's first update moves weights by the learning rate.

Speed (2-core CPU): the subprocesses share one persistent XLA compilation cache (every program is
compiled once per session) and draw random numbers with JAX's "rbg" generator, whose dropout
compiles about twice as fast as threefry's on CPU (the library's default is unchanged). Every
compared pair of runs uses the same settings, so neither changes what is asserted. Independent
runs execute two at a time in background threads, all started when the first test needs one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from research import cli
from research.config import load_config
from research.data.pipeline import load_dataset
from research.models.build import build_generator
from research.models.generator import init_generator, param_group
from research.train import loop
from research.train.checkpoint import Checkpointer
from research.train.checkpoint_damage import restore_newest
from research.train.loss import token_loss_sums
from research.train.optim import make_optimizer
from research.train.run_log import read_metrics
from research.train.steps import (
    compile_ahead,
    init_state,
    make_train_step,
    replicate,
    replicated_init_state,
    shard,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.py"
STEPS = 12  # 10 batches per epoch: the runs cross an epoch boundary
EVAL_EVERY = 4
FIRST_KILL_STEP = 3  # the first SIGKILL lands once this step's checkpoint exists
# The main run: dropout on (0.1 everywhere, the default); checkpoints at 4, 8, 12.
MAIN = (
    ("train.steps", str(STEPS)),
    ("train.eval_every", str(EVAL_EVERY)),
    ("train.checkpoint_every", "4"),
    ("train.keep_checkpoints", "3"),
)
# The same training with a checkpoint after every step (for the kills); numerically identical.
EVERY_STEP = (*MAIN, ("train.checkpoint_every", "1"), ("train.keep_checkpoints", "2"))
DROPOUT_OFF = tuple(
    (key, "0.0")
    for key in (
        "model.decoder.resid_pdrop",
        "model.decoder.embd_pdrop",
        "model.decoder.attn_pdrop",
        "model.encoder.hidden_dropout_prob",
        "model.encoder.attention_probs_dropout_prob",
    )
)
NO_DROPOUT = (*MAIN, *DROPOUT_OFF)
STAGE1_STEPS = 3
# Two stages of a soft-prefix model (so there is an encoder to freeze), dropout off.
TWO_STAGE = (
    *NO_DROPOUT,
    ("model.conditioning", "prefix"),
    ("train.two_stage", "True"),
    ("train.stage1_max_steps", str(STAGE1_STEPS)),
    ("train.checkpoint_every", "1"),
    ("train.keep_checkpoints", str(STEPS)),  # keep every step to inspect the switch
)
# Runs that split the global batch differently sum it in another order (float32). Measured over
# 12 steps: losses differ by <= 3e-7 relative, parameters by <= 1.4e-6 absolute. A wrong
# weighting of devices or micro-batches moves the losses by ~1e-2.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
RUN_TIMEOUT = 300  # seconds for one run to start, compile and finish
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes a step under "<step>.orbax-checkpoint-tmp..."
# (environment variables that would make a single-process run join a cluster)
CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


# ----------------------------------------------------------------------------- running commands


def train_command(workdir: Path, overrides) -> list[str]:
    """The CLI command of a run (``python -m research`` is the ``research`` console script)."""
    return [
        sys.executable,
        "-m",
        "research",
        "train",
        "--config",
        str(TINY),
        "--workdir",
        str(workdir),
        *(f"--config.{key}={value}" for key, value in overrides),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def complete_steps(workdir: Path) -> list[int]:
    """Steps whose checkpoint directory is complete (renamed from its temporary name)."""
    folder = workdir / "checkpoints"
    names = [entry.name for entry in os.scandir(folder)] if folder.is_dir() else []
    return sorted(int(name) for name in names if name.isdigit())


def steps_being_saved(workdir: Path) -> list[int]:
    """Steps with a temporary (unfinished) checkpoint directory."""
    folder = workdir / "checkpoints"
    names = [entry.name for entry in os.scandir(folder)] if folder.is_dir() else []
    return sorted(int(name.split(".")[0]) for name in names if TMP_MARK in name)


@dataclasses.dataclass
class Finished:
    returncode: int
    log: Path

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Runs:
    """Background training jobs, two at a time, each run once per module.

    ``result(name)`` starts job ``name`` (after its dependencies) unless it is running or done,
    and waits for it. Jobs are submitted in dependency order to a FIFO pool, so a job that waits
    for another only ever waits for one that has already started.
    """

    def __init__(self, root: Path, cache: Path):
        self.root, self.cache = root, cache
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._closed = False

    def env(self, devices: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}
        env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "TPU_"))}
        env.update(
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_PLATFORMS="cpu",
            JAX_DEFAULT_PRNG_IMPL="rbg",
            JAX_COMPILATION_CACHE_DIR=str(self.cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            HF_HUB_OFFLINE="1",
        )
        return env

    def start(self, command: list[str], log: Path, devices: int = 4) -> subprocess.Popen:
        if self._closed:  # the module's tests are over; a job still running stops here
            raise RuntimeError("no new runs after the tests ended")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                command, cwd=REPO, env=self.env(devices), stdout=out, stderr=subprocess.STDOUT
            )
        self._procs.add(proc)
        return proc

    def finish(self, proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT) -> Finished:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"run did not finish in {timeout} s:\n{tail(log)}") from None
        self._procs.discard(proc)
        return Finished(proc.returncode, log)

    def run(self, command: list[str], log: Path, devices: int = 4) -> Finished:
        """Run to the end; fails with the log's tail unless the exit code is 0."""
        done = self.finish(self.start(command, log, devices), log)
        assert done.returncode == 0, f"{shlex.join(command)} failed:\n{tail(log)}"
        return done

    def submit(self, name: str) -> Future:
        job = JOBS[name]
        for dependency in job.needs:
            self.submit(dependency)
        with self._lock:
            if name not in self._futures:
                self._futures[name] = self._pool.submit(job.run, self)
            return self._futures[name]

    def result(self, name: str):
        return self.submit(name).result()

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(self._procs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_until(proc: subprocess.Popen, log: Path, condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` every 2 ms while ``proc`` runs; fail if it ends or takes too long."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} after {RUN_TIMEOUT} s:\n{tail(log)}")
        time.sleep(0.002)


# ----------------------------------------------------------------------------- reading results


@functools.cache
def state_target(conditioning: str, stage: int) -> dict:
    """Shapes and dtypes of the train state of the runs here (nothing is computed).

    The runs differ in nothing that shapes the state but the conditioning method (which
    parameters exist) and the stage (which groups train, which shapes the optimizer state).
    """
    cfg = load_config(TINY, (*TWO_STAGE, ("model.conditioning", conditioning)))
    dataset = load_dataset(cfg.data)
    model, _ = build_generator(cfg, dataset.num_users, dataset.num_items)
    params = jax.eval_shape(lambda key: init_generator(model, key), jax.random.key(0))
    trainable = tuple(cfg.train.stage1_trainable if stage == 1 else cfg.train.trainable)
    tx = make_optimizer(
        params,
        trainable,
        optax.constant_schedule(1.0),  # the schedule does not change the state's structure
        weight_decay=cfg.train.weight_decay,
        clip_norm=cfg.train.clip_norm or None,
    )
    return jax.eval_shape(lambda p: init_state(p, tx), params)


def restore(
    workdir: Path, step: int | None = None, conditioning: str = "id_prompt"
) -> tuple[int, dict, dict]:
    """``(step, state, meta)`` of ``step`` (default: the newest intact one, as a resume finds
    it) through the real Checkpointer."""

    def target(meta: dict) -> dict:
        return state_target(conditioning, meta["progress"]["stage"])

    with Checkpointer(workdir) as checkpoints:
        if step is None:
            resumed = restore_newest(checkpoints, target)
            assert resumed is not None, f"no checkpoint in {workdir}"
            return resumed
        state, meta = checkpoints.restore(step, target=target(checkpoints.restore_meta(step)))
    return step, state, meta


def restore_copy(workdir: Path, scratch: Path) -> tuple[int, dict, dict]:
    """Like ``restore`` on a copy, so the next run meets the workdir exactly as it was left."""
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(workdir / "checkpoints", scratch / "checkpoints")
    return restore(scratch)


def restore_prefix(workdir: Path, step: int | None = None) -> tuple[int, dict, dict]:
    return restore(workdir, step, conditioning="prefix")


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_bitwise_equal(got, want, what: str) -> None:
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys(), f"{what}: different trees"
    differ = [
        k for k in want if got[k].dtype != want[k].dtype or not np.array_equal(got[k], want[k])
    ]
    assert not differ, f"{what}: {len(differ)} of {len(want)} leaves differ, e.g. {differ[:3]}"


def max_abs_diff(got, want) -> float:
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    return max(float(np.max(np.abs(got[k] - want[k]), initial=0.0)) for k in want)


def groups(params) -> dict[str, dict]:
    """``{group: {path: array}}`` for the encoder / decoder / conditioning groups."""
    out: dict[str, dict] = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        out.setdefault(param_group(path), {})["/".join(path)] = np.asarray(leaf)
    return out


def rows(workdir: Path, split: str) -> list[dict]:
    return [row for row in read_metrics(workdir) if row["split"] == split]


def losses(workdir: Path, split: str = "train") -> np.ndarray:
    return np.array([row["loss"] for row in rows(workdir, split)])


def run_record(workdir: Path) -> dict:
    return json.loads((workdir / "run.json").read_text())


# ----------------------------------------------------------------------------- the jobs


@dataclasses.dataclass
class Kill:
    trigger: str
    delay: float
    inside_save: bool  # a temporary checkpoint directory was left behind
    restored_step: int | None  # the latest checkpoint afterwards (None: there is none)
    state_step: int | None  # the step counter inside that checkpoint's state
    damaged: int | None = None  # "fallback": the step damaged before the run
    damaged_files: dict | None = None  # its files' digests, as damaged
    moved: bool = False  # the run had moved it to corrupt/ when the kill landed


@dataclasses.dataclass
class Stop:
    run: Finished
    resumed_from: int
    step: int  # the latest checkpoint after the run stopped


@dataclasses.dataclass
class Interrupted:
    workdir: Path
    kills: list[Kill]
    stops: dict[str, Stop]  # SIGINT, then SIGTERM
    final: Finished


# (trigger, seconds after it). "saving": a new step's checkpoint is being written (the kill lands
# inside the save; the first one inside the run's very first save, so no checkpoint exists yet);
# "checkpoint": the checkpoint of step FIRST_KILL_STEP (or a later one) exists; "trained": a new
# step's checkpoint is complete; "fallback": the newest checkpoint was damaged before the run
# started, and the run has said it does not restore (the kill lands while it falls back to the
# step before, or while it moves the damaged one aside).
KILLS = (
    ("saving", 0.0),
    ("checkpoint", 0.0),
    ("fallback", 0.0),
    ("saving", 0.02),
    ("trained", 0.05),
)


def damage(step_dir: Path) -> dict[str, str]:
    """Truncate the step's largest parameter file (a disk error); returns the files' digests."""
    biggest = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=os.path.getsize)
    with biggest.open("r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    return digests(step_dir)


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class NewSaves:
    """Which steps a run is saving now, leaving out the leftovers of an earlier killed run.

    A killed save leaves ``<step>.orbax-checkpoint-tmp`` behind, with the same name a new save
    of that step uses. The new run removes leftovers when it starts (long before it saves),
    so a name counts as new once it has been seen missing.
    """

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.leftovers = set(steps_being_saved(workdir))

    def __call__(self) -> set[int]:
        saving = set(steps_being_saved(self.workdir))
        self.leftovers &= saving
        return saving - self.leftovers


def kill_trigger(trigger: str, workdir: Path, resumed_from: int, saves: NewSaves, log: Path):
    if trigger == "fallback":
        return lambda: "does not restore" in log.read_text(errors="replace")
    if trigger == "checkpoint":
        return lambda: max(complete_steps(workdir), default=0) >= FIRST_KILL_STEP
    if trigger == "saving":
        return lambda: any(step > resumed_from for step in saves())
    return lambda: any(step > resumed_from for step in complete_steps(workdir))


def interrupted_job(runs: Runs) -> Interrupted:
    """One run killed with SIGKILL at four moments, stopped with SIGINT and SIGTERM, then run to
    the end.

    Each restart is the same command. After every kill the workdir's latest checkpoint is
    restored (from a copy) to check it is valid.
    """
    workdir = runs.root / "interrupted"
    command = train_command(workdir, EVERY_STEP)
    kills, resumed_from = [], 0
    for index, (trigger, delay) in enumerate(KILLS):
        log = runs.root / f"interrupted-kill{index}.log"
        saves = NewSaves(workdir)
        damaged = max(complete_steps(workdir)) if trigger == "fallback" else None
        damaged_files = damage(workdir / "checkpoints" / str(damaged)) if damaged else None
        proc = runs.start(command, log)
        wait_until(proc, log, kill_trigger(trigger, workdir, resumed_from, saves, log), trigger)
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before kill {index}:\n{tail(log)}"
        proc.send_signal(signal.SIGKILL)
        runs.finish(proc, log)
        inside_save = bool(saves())
        moved = (
            damaged is not None and (workdir / "checkpoints" / "corrupt" / str(damaged)).exists()
        )
        if complete_steps(workdir):
            step, state, _ = restore_copy(workdir, runs.root / "restore-scratch")
            kills.append(
                Kill(
                    trigger,
                    delay,
                    inside_save,
                    step,
                    int(state["step"]),
                    damaged,
                    damaged_files,
                    moved,
                )
            )
            resumed_from = step
        else:
            kills.append(Kill(trigger, delay, inside_save, None, None))

    stops = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        log = runs.root / f"interrupted-{signum.name}.log"
        proc = runs.start(command, log)
        trained = kill_trigger("trained", workdir, resumed_from, NewSaves(workdir), log)
        wait_until(proc, log, trained, "a new step")
        proc.send_signal(signum)
        stopped = runs.finish(proc, log)
        stops[signum.name] = Stop(stopped, resumed_from, max(complete_steps(workdir)))
        resumed_from = stops[signum.name].step

    final = runs.run(command, runs.root / "interrupted-final.log")
    return Interrupted(workdir, kills, stops, final)


def single_run(name: str, overrides: tuple, devices: int = 4) -> Callable[[Runs], Path]:
    def job(runs: Runs) -> Path:
        workdir = runs.root / name
        runs.run(train_command(workdir, overrides), runs.root / f"{name}.log", devices)
        return workdir

    return job


def multihost_job(runs: Runs) -> Path:
    """Two processes with 2 CPU devices each on one coordinator, like two hosts."""
    workdir = runs.root / "multihost"
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for process_id in range(2):
        overrides = (
            *MAIN,
            ("distributed.coordinator_address", address),
            ("distributed.num_processes", "2"),
            ("distributed.process_id", str(process_id)),
        )
        log = runs.root / f"multihost-{process_id}.log"
        procs.append((runs.start(train_command(workdir, overrides), log, devices=2), log))
    try:
        done = [runs.finish(proc, log) for proc, log in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    for result in done:
        assert result.returncode == 0, f"a process failed:\n{tail(result.log)}"
    return workdir


def truncated_copy(source: Path, target: Path, last_step: int) -> None:
    """``source`` as a run killed right after saving ``last_step`` would have left it."""
    shutil.copytree(source, target)
    for step in complete_steps(target):
        if step > last_step:
            shutil.rmtree(target / "checkpoints" / str(step))


def resumed_two_stage_job(last_step: int) -> Callable[[Runs], Path]:
    def job(runs: Runs) -> Path:
        workdir = runs.root / f"two_stage_from_{last_step}"
        truncated_copy(runs.result("two_stage"), workdir, last_step)
        runs.run(train_command(workdir, TWO_STAGE), runs.root / f"{workdir.name}.log")
        return workdir

    return job


NAN_FROM = 4  # the NaN runs resume from this (good) checkpoint of the no_dropout run


def nan_job(runs: Runs) -> dict[str, tuple[Path, Finished]]:
    """``{mode: (workdir, result)}`` of the NaN worker resumed from step NAN_FROM.

    A checkpoint after every step, so that a diverged step would be saved unless caught.
    """
    out = {}
    for mode in ("loss", "gradient"):
        workdir = runs.root / f"nan_{mode}"
        truncated_copy(runs.result("no_dropout"), workdir, NAN_FROM)
        overrides = (*NO_DROPOUT, ("train.checkpoint_every", "1"))
        command = [
            sys.executable,
            "-m",
            "tests.train_nan_worker",
            mode,
            str(TINY),
            str(workdir),
            *(f"--config.{key}={value}" for key, value in overrides),
        ]
        log = runs.root / f"nan_{mode}.log"
        out[mode] = workdir, runs.finish(runs.start(command, log), log)
    return out


@dataclasses.dataclass
class Job:
    run: Callable[[Runs], object]
    needs: tuple[str, ...] = ()


# Insertion order = start order when every test runs: the long sequential chain and the run
# with two cold compiles first, the reference once the chain has compiled their shared program,
# and last the two processes that can use both cores by themselves.
JOBS = {
    "interrupted": Job(interrupted_job),
    "two_stage": Job(single_run("two_stage", TWO_STAGE)),
    "reference": Job(single_run("reference", MAIN)),
    "two_stage_from_2": Job(resumed_two_stage_job(STAGE1_STEPS - 1), needs=("two_stage",)),
    "two_stage_from_3": Job(resumed_two_stage_job(STAGE1_STEPS), needs=("two_stage",)),
    "no_dropout": Job(single_run("no_dropout", NO_DROPOUT)),
    "one_device": Job(single_run("one_device", NO_DROPOUT, devices=1)),
    "accumulation": Job(single_run("accumulation", (*NO_DROPOUT, ("train.accum_steps", "2")))),
    "nan": Job(nan_job, needs=("no_dropout",)),
    "multihost": Job(multihost_job),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Starts every job that a selected test of this module uses, two at a time."""
    runs = Runs(tmp_path_factory.mktemp("train_runs"), tmp_path_factory.mktemp("jax_cache"))
    wanted = set()
    for item in request.session.items:
        if item.module.__name__ == __name__:
            wanted |= {name.removesuffix("_run") for name in item.fixturenames}
    for name in JOBS:
        if name in wanted:
            runs.submit(name)
    yield runs
    runs.close()


def job_fixture(name: str):
    @pytest.fixture(scope="module", name=f"{name}_run")
    def fixture(runs):
        return runs.result(name)

    return fixture


interrupted_run = job_fixture("interrupted")
reference_run = job_fixture("reference")
no_dropout_run = job_fixture("no_dropout")
one_device_run = job_fixture("one_device")
accumulation_run = job_fixture("accumulation")
multihost_run = job_fixture("multihost")
two_stage_run = job_fixture("two_stage")
nan_run = job_fixture("nan")
two_stage_from_2_run = job_fixture("two_stage_from_2")
two_stage_from_3_run = job_fixture("two_stage_from_3")


# ----------------------------------------------------------------------------- tests


class ToyLM(nn.Module):
    """Embedding, dropout, projection: the smallest model the train step accepts."""

    @nn.compact
    def __call__(self, batch, deterministic=True):
        hidden = nn.Embed(16, 8)(batch["decoder_ids"])
        hidden = nn.Dropout(0.1)(hidden, deterministic=deterministic)
        return nn.Dense(16)(hidden)


def toy_training(build=replicated_init_state):
    """``(step, state, batch, seed_key)``: a new pmapped train step of :class:`ToyLM` and its
    inputs on every device, the state made by ``build(params, tx, devices)``."""
    model = ToyLM()
    ids = np.arange(48, dtype=np.int32).reshape(8, 6) % 16
    batch = shard({"decoder_ids": ids, "decoder_mask": np.ones_like(ids)}, jax.device_count(), 1)
    params = model.init(jax.random.key(0), {"decoder_ids": ids})["params"]
    tx = optax.adamw(1e-3)
    labels = jax.tree.map(lambda _: "train", params)
    step = make_train_step(model, tx, labels, optax.constant_schedule(1e-3))
    state = build(params, tx, jax.device_count())
    return step, state, batch, replicate(jax.random.key(1), jax.device_count())


@pytest.mark.parametrize(
    "build",
    [lambda p, tx, n: replicate(init_state(p, tx), n), replicated_init_state],
    ids=["replicate", "replicated_init_state"],
)
def test_train_step_on_its_own_output_does_not_compile_again(build, caplog):
    """The loop replicates the state, then feeds the step its own output: one compilation.

    (State laid out unlike the step's output made the second step compile the whole train step
    again, as long as the first compile.)
    """
    step, state, batch, seed = toy_training(build)
    state, _ = step(state, batch, seed)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for _ in range(2):
            state, metrics = step(state, batch, seed)
        jax.block_until_ready(metrics)
    compiled = [record.message[:120] for record in caplog.records if "Compiling" in record.message]
    assert not compiled, compiled


def test_a_step_compiled_ahead_compiles_nothing_more_and_equals_a_plain_step(caplog):
    """``compile_ahead`` leaves the call path as it was: its first call compiles nothing, still
    donates the state, and gives bit for bit what a step compiled by its own first call gives
    (a second code path: another step from ``make_train_step``, not compiled ahead)."""
    plain, state, batch, seed = toy_training()
    want = plain(state, batch, seed)
    step, state, batch, seed = toy_training()
    compile_ahead(step, state, batch, seed)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # only read
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        got = step(state, batch, seed)
        jax.block_until_ready(got)
    compiled = [record.message[:120] for record in caplog.records if "Compiling" in record.message]
    assert not compiled, compiled
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # donated to the step
    assert_bitwise_equal(got, want, "the step compiled ahead")


def test_state_built_on_the_devices_is_the_replicated_host_state():
    """``replicated_init_state`` (one jit) gives ``replicate(init_state(...))`` bit for bit,
    laid out alike, also from parameters committed to one device (as loaded weights can be)."""
    params = ToyLM().init(jax.random.key(0), {"decoder_ids": np.zeros((2, 6), np.int32)})
    params = {**params["params"], "bfloat16_scale": jnp.full((3,), 0.3, jnp.bfloat16)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    for devices in sorted({1, jax.local_device_count()}):
        for given in (params, jax.device_put(params, jax.local_devices()[0])):
            built = replicated_init_state(given, tx, devices)
            expected = replicate(init_state(params, tx), devices)
            assert jax.tree.structure(built) == jax.tree.structure(expected)
            for got, want in zip(jax.tree.leaves(built), jax.tree.leaves(expected), strict=True):
                assert got.sharding == want.sharding and got.dtype == want.dtype
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("one_device", [True, False], ids=["one_device", "all_devices"])
def test_train_step_is_adamw_on_the_mean_loss_and_skips_a_nonfinite_step(one_device):
    """One step equals optax's AdamW applied, outside the step, to the gradient of the mean
    token loss over the whole batch (a second code path); a step whose loss is NaN returns the
    state as it was, step counter included. On one device the step sums nothing over devices
    (no all-reduce), on several it sums the devices' shares."""
    model = ToyLM()
    ids = np.arange(48, dtype=np.int32).reshape(8, 6) * 5 % 16
    host = {"decoder_ids": ids, "decoder_mask": np.ones_like(ids)}
    devices = 1 if one_device else jax.device_count()
    batch = shard(host, devices, 1)
    params = model.init(jax.random.key(0), host)["params"]
    tx = optax.adamw(1e-2, weight_decay=0.1)
    labels = jax.tree.map(lambda _: "train", params)
    step = make_train_step(model, tx, labels, optax.constant_schedule(1e-2), deterministic=True)
    seed = replicate(jax.random.key(1), devices)
    new, _ = step(replicate(init_state(params, tx), devices), batch, seed)

    def mean_loss(p):
        total, count = token_loss_sums(model.apply({"params": p}, host), ids, host["decoder_mask"])
        return total / count

    updates, _ = tx.update(jax.grad(mean_loss)(params), tx.init(params), params)
    expected = optax.apply_updates(params, updates)
    assert int(new["step"][0]) == 1
    for got, want in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want), rtol=0, atol=1e-6)

    poisoned = jax.tree.map(lambda x: x.at[0, 0].set(np.nan) if x.ndim == 2 else x, params)
    state = replicate(init_state(poisoned, tx), devices)
    before = jax.tree.map(np.asarray, state)
    after, metrics = step(state, batch, seed)
    assert np.isnan(np.asarray(metrics["loss"])).all()
    for got, want in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)


# Run first (these tests start no background job), so the timing below is not contended.
BAD_CONFIGS = [
    ("--config.model.conditioning=bogus", ["model.conditioning", "'bogus'", "valid choices"]),
    ("--config.train.learning_rate=-0.001", ["train.learning_rate", "positive"]),
    ("--config.train.learning_rat=0.1", ["train.learning_rat", "did you mean train.learning_rate"]),
]


@pytest.mark.parametrize(
    "override, names", BAD_CONFIGS, ids=["bad_choice", "negative_rate", "unknown_key"]
)
def test_bad_config_stops_the_cli_before_training(override, names, tmp_path, monkeypatch, capsys):
    """``research train`` returns 2 with a message naming the key; train() is never reached."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("train() was called with a bad config")

    monkeypatch.setattr(loop, "train", must_not_run)
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", str(TINY), "--workdir", str(workdir), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    for name in names:
        assert name in err, err
    assert not workdir.exists()


def test_bad_config_command_exits_2_before_anything_is_built(tmp_path):
    """The real command: exit code 2, the key in stderr, no workdir, no progress bar."""
    workdir = tmp_path / "run"
    override, names = BAD_CONFIGS[0]
    command = [*train_command(workdir, ()), override]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    print(f"bad config: exit {result.returncode} after {time.perf_counter() - start:.1f} s")
    assert result.returncode == 2, result.stderr
    for name in names:
        assert name in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert "train:" not in result.stdout + result.stderr  # no progress bar: no step compiled
    assert not workdir.exists()  # train() creates it first thing: it never started


def test_sigkill_then_rerun_ends_bitwise_equal_to_an_uninterrupted_run(
    interrupted_run, reference_run
):
    """Killed (4x SIGKILL), stopped (SIGINT, SIGTERM), resumed: same state and losses, bitwise."""
    run = interrupted_run
    assert run.kills[1].restored_step >= FIRST_KILL_STEP  # the "checkpoint" kill
    assert f"Resuming {run.workdir} from step {run.stops['SIGTERM'].step} " in run.final.text
    step, state, _ = restore(run.workdir)
    ref_step, ref_state, _ = restore(reference_run)
    assert step == ref_step == STEPS
    assert_bitwise_equal(state, ref_state, "resumed vs uninterrupted final state")
    for split in ("train", "validation"):
        np.testing.assert_array_equal(losses(run.workdir, split), losses(reference_run, split))


def test_every_kill_leaves_a_restorable_checkpoint(interrupted_run):
    """After each SIGKILL (two inside a save) the latest checkpoint restores, or (killed in the
    very first save) there is none and the next run starts afresh."""
    kills = interrupted_run.kills
    print("kills:", kills)
    first, *later = kills
    assert first.inside_save and first.restored_step is None, first
    log = (interrupted_run.workdir.parent / "interrupted-kill1.log").read_text()
    assert "Resuming" not in log
    for kill in later:
        assert kill.restored_step is not None and kill.state_step == kill.restored_step, kill
    # No kill loses progress; only a fallback goes back, to the step before the damaged one.
    for before, after in zip(later, later[1:], strict=False):
        if after.trigger == "fallback":
            assert after.restored_step == after.damaged - 1, kills
        else:
            assert after.restored_step >= before.restored_step, f"a kill lost progress: {kills}"
    assert sum(kill.inside_save for kill in kills) >= 2, f"kills inside a save: {kills}"


def test_a_kill_during_fallback_loses_nothing(interrupted_run):
    """Killed while falling back past a damaged checkpoint (before or after moving it aside):
    the next run resumes from the step before the damaged one, which ends up, byte for byte,
    in checkpoints/corrupt/ (and the run still ends bitwise right: first test)."""
    run = interrupted_run
    index, kill = next((i, k) for i, k in enumerate(run.kills) if k.trigger == "fallback")
    print("fallback kill:", kill)
    assert kill.restored_step == kill.damaged - 1, kill
    following = (run.workdir.parent / f"interrupted-kill{index + 1}.log").read_text()
    assert f"Resuming {run.workdir} from step {kill.damaged - 1} " in following
    assert ("does not restore" in following) is not kill.moved  # moved once, by one of them
    assert (
        digests(run.workdir / "checkpoints" / "corrupt" / str(kill.damaged)) == kill.damaged_files
    )


@pytest.mark.parametrize("name, next_run", [("SIGINT", "SIGTERM"), ("SIGTERM", "final")])
def test_sigterm_and_sigint_finish_the_step_save_and_exit_zero(name, next_run, interrupted_run):
    """Stopped mid-run: exit 0, a message, a checkpoint at the step reached; the next run of
    the same command resumes from exactly that step (and ends bitwise right: first test)."""
    run, stop = interrupted_run, interrupted_run.stops[name]
    assert stop.run.returncode == 0, tail(stop.run.log)
    assert stop.resumed_from < stop.step < STEPS
    assert f"{name} received: saved step {stop.step} in " in stop.run.text
    assert "rerun the same command to resume" in stop.run.text
    following = run.final if next_run == "final" else run.stops[next_run].run
    assert f"Resuming {run.workdir} from step {stop.step} " in following.text


def test_metrics_have_each_step_once_after_resumes(interrupted_run):
    train_steps = [row["step"] for row in rows(interrupted_run.workdir, "train")]
    eval_steps = [row["step"] for row in rows(interrupted_run.workdir, "validation")]
    assert train_steps == list(range(1, STEPS + 1))
    assert eval_steps == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))


def test_run_json_records_config_versions_devices_commit_and_command(reference_run):
    record = run_record(reference_run)
    command = train_command(reference_run, MAIN)
    assert record["command"] == shlex.join(["research", *command[3:]])
    assert record["config"] == json.loads(load_config(TINY, MAIN).to_json())
    assert record["config"]["train"]["steps"] == STEPS
    assert record["config"]["model"]["decoder"]["n_embd"] == 32  # from tests/configs/tiny.py
    assert record["versions"]["python"] == platform.python_version()
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        assert record["versions"][package] == importlib.metadata.version(package)
    devices = record["devices"]
    assert devices["platform"] == "cpu"
    assert devices["device_kind"] == jax.devices("cpu")[0].device_kind
    assert (devices["device_count"], devices["local_device_count"]) == (4, 4)
    assert devices["process_count"] == 1
    commit = record["git_commit"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit), commit
    exists = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", commit.split("-")[0] + "^{commit}"]
    )
    assert exists.returncode == 0, f"{commit} is not a commit of {REPO}"


def test_metrics_rows_follow_the_schedule_and_tensorboard_is_written(reference_run):
    """Rows carry step, loss, perplexity = exp(loss), the warmup + cosine rate, tokens/s."""
    cfg = load_config(TINY, MAIN)
    peak, warmup = cfg.train.learning_rate, cfg.train.warmup_steps
    train_rows = rows(reference_run, "train")
    assert [row["step"] for row in train_rows] == list(range(1, STEPS + 1))
    for row in train_rows:
        t = row["step"] - 1  # the rate applied by step s is the schedule at s - 1
        if t < warmup:
            expected = peak * t / warmup
        else:
            expected = peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (STEPS - warmup)))
        assert row["learning_rate"] == pytest.approx(expected, rel=1e-6, abs=1e-9), row
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-9), row
        assert row["tokens_per_s"] > 0
    for row in rows(reference_run, "validation"):
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-9), row
    events = list((reference_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    content = b"".join(path.read_bytes() for path in events)
    for tag in (b"train/loss", b"train/learning_rate", b"validation/loss"):
        assert tag in content, tag


def test_log_file_output_is_plain_lines_with_data_and_validation_results(reference_run):
    """The run's stdout/stderr went to a file: no bars, the data load and every validation."""
    log = (reference_run.parent / "reference.log").read_text()
    assert "\r" not in log
    assert re.search(r"^loading data: synthetic \.\.\.$", log, re.M)
    loaded = re.search(
        r"^loaded data in [\d.]+ s: train (\d+), validation (\d+), test (\d+)", log, re.M
    )
    assert loaded and tuple(map(int, loaded.groups())) == (80, 10, 10)
    assert len(re.findall(rf"^train: step {STEPS}/{STEPS} \(100%\)", log, re.M)) == 1
    printed = re.findall(
        r"^step (\d+): validation loss ([\d.]+), perplexity ([\d.]+) "
        r"\(best so far: loss ([\d.]+)",
        log,
        re.M,
    )
    logged = rows(reference_run, "validation")
    assert [int(p[0]) for p in printed] == [row["step"] for row in logged]
    best = math.inf
    for (_, loss, perplexity, best_printed), row in zip(printed, logged, strict=True):
        best = min(best, row["loss"])
        assert float(loss) == pytest.approx(row["loss"], abs=1e-4)
        assert float(perplexity) == pytest.approx(row["perplexity"], abs=1e-2)
        assert float(best_printed) == pytest.approx(best, abs=1e-4)


def test_one_device_matches_four_devices(one_device_run, no_dropout_run):
    """Same global batch on 1 and on 4 devices: the same loss curve up to float rounding.

    Dropout is off: each device draws its own dropout mask (the key folds in the device index),
    so with dropout the two layouts train on different masks by design.
    """
    assert run_record(one_device_run)["devices"]["device_count"] == 1
    assert run_record(no_dropout_run)["devices"]["device_count"] == 4
    for split in ("train", "validation"):
        np.testing.assert_allclose(
            losses(one_device_run, split), losses(no_dropout_run, split), rtol=LOSS_RTOL
        )
    diff = max_abs_diff(restore(one_device_run)[1], restore(no_dropout_run)[1])
    print(f"1 vs 4 devices: max |param diff| = {diff:.2e}")
    assert diff <= PARAM_ATOL


def test_gradient_accumulation_matches_one_big_step(accumulation_run, no_dropout_run):
    """accum_steps=2 with the same global batch: same losses as accum_steps=1 (dropout off)."""
    assert run_record(accumulation_run)["config"]["train"]["accum_steps"] == 2
    for split in ("train", "validation"):
        np.testing.assert_allclose(
            losses(accumulation_run, split), losses(no_dropout_run, split), rtol=LOSS_RTOL
        )
    diff = max_abs_diff(restore(accumulation_run)[1], restore(no_dropout_run)[1])
    print(f"accumulation: max |param diff| = {diff:.2e}")
    assert diff <= PARAM_ATOL


def test_two_processes_train_like_one_process_with_four_devices(multihost_run, reference_run):
    """2 processes x 2 CPU devices (gloo) vs 1 process x 4 devices, dropout on, same batches."""
    devices = run_record(multihost_run)["devices"]
    assert (devices["process_count"], devices["device_count"]) == (2, 4)
    # Only process 0 writes logs: one row per step.
    assert [row["step"] for row in rows(multihost_run, "train")] == list(range(1, STEPS + 1))
    for split in ("train", "validation"):
        np.testing.assert_allclose(
            losses(multihost_run, split), losses(reference_run, split), rtol=LOSS_RTOL
        )
    step, state, _ = restore(multihost_run)  # written the Orbax multi-process way
    assert step == STEPS
    diff = max_abs_diff(state, restore(reference_run)[1])
    print(f"2 processes vs 1: max |state diff| = {diff:.2e}")
    assert diff <= PARAM_ATOL


@pytest.mark.parametrize(
    "mode, message",
    [
        ("loss", rf"loss is nan at step {NAN_FROM + 1}; stopping"),
        ("gradient", rf"gradient norm is nan \(loss \d+\.\d+\) at step {NAN_FROM + 1}; stopping"),
    ],
    ids=["loss", "gradient"],
)
def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    mode, message, nan_run, no_dropout_run
):
    """A NaN loss, or a NaN gradient under a finite loss, at step 5 stops the run at step 5.

    Every step would be saved, so the diverged step 5 must not be: step 4 stays the latest and
    bitwise what it was.
    """
    workdir, result = nan_run[mode]
    assert result.returncode == 1, tail(result.log)
    assert re.search(rf"TrainingDiverged: {message}", result.text), tail(result.log)
    checkpoints = workdir.resolve() / "checkpoints"
    assert f"The last good checkpoint is step {NAN_FROM} in {checkpoints}" in result.text
    assert complete_steps(workdir) == [NAN_FROM]
    assert steps_being_saved(workdir) == []
    _, state, _ = restore(workdir)
    _, original, _ = restore(no_dropout_run, step=NAN_FROM)
    assert_bitwise_equal(state, original, "checkpoint after the NaN vs before")


def test_two_stage_trains_only_stage1_groups_until_the_switch(two_stage_run):
    """Stage 1 (steps 1-3) changes only the conditioning group; stage 2 changes all groups.

    Step 1 applies learning rate 0 (warmup starts at 0, checked in the metrics), so the step-1
    checkpoint holds the initial parameters.
    """
    assert rows(two_stage_run, "train")[0]["learning_rate"] == 0.0
    params = {
        step: groups(restore_prefix(two_stage_run, step)[1]["params"])
        for step in range(1, STAGE1_STEPS + 2)
    }
    initial = params[1]
    for step in range(2, STAGE1_STEPS + 1):
        for group in ("encoder", "decoder"):
            assert_bitwise_equal(params[step][group], initial[group], f"{group} at step {step}")
        assert max_abs_diff(params[step]["conditioning"], params[step - 1]["conditioning"]) > 0
    # Stage 2's fresh AdamW moves every weight with a nonzero gradient by lr * (1 + wd * p) in its
    # first update (m / sqrt(v) = sign(g)): the largest change is the learning rate the metrics
    # report, up to weight decay (|wd * p| < 1%).
    after, before = params[STAGE1_STEPS + 1], params[STAGE1_STEPS]
    lr = rows(two_stage_run, "train")[STAGE1_STEPS]["learning_rate"]
    assert lr > 0
    for group in ("encoder", "decoder", "conditioning"):
        change = max_abs_diff(after[group], before[group])
        assert change == pytest.approx(lr, rel=1e-2), f"{group} in stage 2's first step"


def check_resumed_two_stage_run(workdir: Path, reference: Path) -> None:
    step, state, meta = restore_prefix(workdir)
    ref_step, ref_state, ref_meta = restore_prefix(reference)
    assert step == ref_step == STEPS
    assert meta["progress"]["stage"] == ref_meta["progress"]["stage"] == 2
    assert_bitwise_equal(state, ref_state, f"{workdir.name} vs uninterrupted two-stage run")
    np.testing.assert_array_equal(losses(workdir), losses(reference))


def test_resume_from_stage1_across_the_switch_is_exact(two_stage_from_2_run, two_stage_run):
    """Resumed from the last stage-1 checkpoint: passes the switch, ends bitwise equal."""
    check_resumed_two_stage_run(two_stage_from_2_run, two_stage_run)


def test_resume_from_the_switch_step_is_exact(two_stage_from_3_run, two_stage_run):
    """Resumed from the checkpoint of the step at which stage 2 begins: ends bitwise equal."""
    check_resumed_two_stage_run(two_stage_from_3_run, two_stage_run)
