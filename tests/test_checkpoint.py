"""Checkpointer: bit-exact round trips, "last K plus best" retention, atomic saves, SIGKILL safety.

The reference for every restored value is the value that was saved (kept in memory, or
recomputed by ``expected_state(step)``, a deterministic function of the step), compared byte for
byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from research.train.checkpoint import DELETED_SUBDIR, Checkpointer, CheckpointMismatch
from research.train.checkpoint_damage import CORRUPT_SUBDIR, NoIntactCheckpoint, restore_newest
from tests.checkpoint_kill_worker import (
    KEEP_LAST,
    assert_bitwise_equal,
    expected_meta,
    expected_state,
    verify_all_steps,
)

REPO = Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def random_bits(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Arbitrary bit patterns of ``dtype`` (NaN payloads, infinities, subnormals, -0)."""
    width = np.dtype(dtype).itemsize * 8
    raw = rng.integers(0, 2**width, size=shape, dtype=np.dtype(f"uint{width}"))
    return raw.view(dtype)


def training_state(seed: int = 0) -> dict:
    """Nested dicts, lists and tuples; bf16 and f32 params; an AdamW state after one update."""
    rng = np.random.default_rng(seed)
    params = {
        "decoder": {
            "wte": jnp.asarray(random_bits(rng, (50, 16), ml_dtypes.bfloat16)),
            "blocks": [
                {"w": jnp.asarray(rng.normal(size=(16, 16)).astype(np.float32))},
                {"w": jnp.asarray(random_bits(rng, (16, 16), np.float32))},
            ],
        },
        "encoder": (jnp.asarray(rng.normal(size=(8,)).astype(np.float32)), jnp.zeros(())),
    }
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.key_data(jax.random.key(seed)),
        "step": jnp.int32(17),
        "host_only": np.arange(5, dtype=np.uint8),
    }


META = {"data": {"epoch": 2, "position": 1234}, "stage": "finetune", "hash": "ab12", "lr": 1e-4}


def listing(ckpt: Checkpointer) -> list[str]:
    """Names on disk in the checkpoints folder, in step order (numbers, so "5" before "14")."""
    names = os.listdir(ckpt.directory)
    return sorted(
        names, key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name)
    )


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bitwise(tmp_path, async_save):
    state = training_state()
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        assert ckpt.save(17, state, META, val_loss=1.5)
        ckpt.wait_until_finished()
    # A fresh Checkpointer reads from disk only; the target is abstract (no values).
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 17 and ckpt.best_step() == 17
        assert ckpt.val_loss(17) == 1.5
        restored, meta = ckpt.restore(target=jax.eval_shape(training_state))
        restored_from_state, _ = ckpt.restore(17, target=state)
    assert_bitwise_equal(restored, state, "abstract target")
    assert_bitwise_equal(restored_from_state, state, "concrete target")
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])  # optax namedtuple
    assert meta == META


def test_async_save_is_unaffected_by_later_changes_to_the_state(tmp_path):
    source = np.arange(4_000_000, dtype=np.float32)
    original = source.copy()
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(1, {"x": source}, {})
        source[:] = -1.0  # the train loop reuses (or donates) its buffers while Orbax writes
        ckpt.wait_until_finished()
        restored, _ = ckpt.restore(target={"x": source})
    assert restored["x"].tobytes() == original.tobytes()


def test_save_is_written_to_a_temporary_directory_then_renamed(tmp_path, monkeypatch):
    renames = []
    real_rename = os.rename

    def spy(src, dst):
        src, dst = Path(src), Path(dst)
        # What the final name would show at this instant, and what is ready to appear there.
        renames.append((src.name, dst, dst.exists(), sorted(os.listdir(src))))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(3, training_state(), META, val_loss=2.0)
    step_renames = [r for r in renames if r[1] == ckpt.directory / "3"]
    assert len(step_renames) == 1
    src_name, _, existed, contents = step_renames[0]
    assert src_name.startswith("3" + TMP_SUFFIX)
    assert not existed
    assert {"state", "meta", "metrics"} <= set(contents)
    assert listing(ckpt) == ["3"]


def test_keeps_the_last_k_plus_the_best(tmp_path):
    state, meta = {"x": np.zeros(3, np.float32)}, {}
    # (step, val_loss or None, steps expected on disk after the save, best step)
    schedule = [
        (1, 5.0, [1], 1),
        (2, None, [1, 2], 1),
        (3, 2.0, [2, 3], 3),
        (4, None, [3, 4], 3),
        (5, 3.0, [3, 4, 5], 3),  # newest kept although worse; best 3 kept although old
        (6, None, [3, 5, 6], 3),
        (7, 1.0, [6, 7], 7),  # new best: the old best goes
        (8, None, [7, 8], 7),
        (9, None, [7, 8, 9], 7),  # steps without a loss never push the best out
    ]
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        for step, val_loss, on_disk, best in schedule:
            assert ckpt.save(step, state, meta, val_loss=val_loss)
            assert ckpt.all_steps() == on_disk, step
            assert listing(ckpt) == [str(s) for s in on_disk], step
            assert ckpt.best_step() == best, step
    # A fresh Checkpointer reads the losses back from disk and goes on with the same rule.
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        assert ckpt.all_steps() == [7, 8, 9] and ckpt.best_step() == 7
        assert ckpt.save(10, state, meta, val_loss=4.0)
        assert ckpt.all_steps() == [7, 9, 10]


def test_without_keep_best_only_the_last_k_remain(tmp_path):
    with Checkpointer(tmp_path, keep_last=2, keep_best=False) as ckpt:
        for step, val_loss in [(1, 0.1), (2, 5.0), (3, None), (4, 6.0)]:
            ckpt.save(step, {"x": np.zeros(1)}, {}, val_loss=val_loss)
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.best_step() == 4  # best among what is left


def test_no_best_step_without_losses(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.best_step() is None and ckpt.latest_step() is None
        ckpt.save(1, {"x": np.zeros(1)}, {})
        assert ckpt.best_step() is None and ckpt.latest_step() == 1


def test_save_every_force_and_existing_steps(tmp_path):
    state = {"x": np.zeros(1)}
    with Checkpointer(tmp_path, save_every=5) as ckpt:
        assert [s for s in range(1, 11) if ckpt.should_save(s)] == [5, 10]
        assert not ckpt.save(3, state, {})
        assert ckpt.save(10, state, {"n": 10})
        assert not ckpt.save(10, state, {"n": 0}, force=True)  # already there: kept as it is
        assert not ckpt.save(5, state, {})  # older than the latest
        assert ckpt.save(12, state, {"n": 12}, force=True)  # end of run / SIGTERM
        assert ckpt.all_steps() == [10, 12]
        assert ckpt.restore(10, target=state)[1] == {"n": 10}


def test_leftovers_of_killed_saves_and_deletes_are_ignored_and_removed(tmp_path):
    state = {"x": np.arange(4, dtype=np.float32)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"n": 1})
    directory = tmp_path / "checkpoints"
    # A save killed before its rename, and a delete killed while emptying the trash.
    (directory / f"5{TMP_SUFFIX}" / "state").mkdir(parents=True)
    (directory / DELETED_SUBDIR / "0" / "state").mkdir(parents=True)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        assert DELETED_SUBDIR not in listing(ckpt)  # Orbax would fail to move a step 0 there
        restored, meta = ckpt.restore(target=state)
        assert restored["x"].tobytes() == state["x"].tobytes() and meta == {"n": 1}
        assert ckpt.save(2, state, {"n": 2})
        assert listing(ckpt) == ["1", "2"]


def test_mismatched_target_names_the_key(tmp_path):
    state = training_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, META)
        as_f32 = jax.tree.map(lambda x: x, state)
        as_f32["params"]["decoder"]["wte"] = jnp.zeros((50, 16), jnp.float32)
        with pytest.raises(
            ValueError, match=r"params\.decoder\.wte is saved as bfloat16\[50, 16\]"
        ):
            ckpt.restore(target=as_f32)
        reshaped = jax.tree.map(lambda x: x, state)
        reshaped["step"] = jnp.zeros((2,), jnp.int32)
        with pytest.raises(ValueError, match=r"state\.step is saved as int32\[\] but the target"):
            ckpt.restore(target=reshaped)
        extra = {**state, "ema": jnp.zeros(3)}
        with pytest.raises(ValueError, match=r"missing in checkpoint: \['ema'\]"):
            ckpt.restore(target=extra)
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 2"):
            ckpt.restore(2, target=state)
    with Checkpointer(tmp_path / "empty") as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore(target=state)


def test_bad_inputs_are_rejected_before_writing(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        state = {"x": np.zeros(2)}
        with pytest.raises(TypeError, match=r"meta\['data'\]\['order'\] is a tuple"):
            ckpt.save(1, state, {"data": {"order": (1, 2)}})
        with pytest.raises(ValueError, match=r"meta\['lr'\] is nan"):
            ckpt.save(1, state, {"lr": float("nan")})
        with pytest.raises(TypeError, match=r"meta\['n'\] is a int64"):
            ckpt.save(1, state, {"n": np.int64(3)})
        with pytest.raises(ValueError, match="val_loss at step 1 is inf"):
            ckpt.save(1, state, {}, val_loss=float("inf"))
        with pytest.raises(TypeError, match=r"state\['rng'\] is a typed PRNG key"):
            ckpt.save(1, {"rng": jax.random.key(0)}, {})
        with pytest.raises(ValueError, match=r"state\['emb'\] has no elements"):
            ckpt.save(1, {"emb": np.zeros((3, 0))}, {})
        with pytest.raises(TypeError, match=r"state\['lr'\] is a float"):
            ckpt.save(1, {"lr": 0.1}, {})
        assert ckpt.all_steps() == []
    with pytest.raises(ValueError, match="keep_last=0"):
        Checkpointer(tmp_path, keep_last=0)


def save_old_layout(workdir: Path, step: int, state: dict, meta: dict, val_loss: float) -> None:
    """A checkpoint as this code wrote them before ``params`` became an item (a frozen copy of
    that save: the whole state in one ``state`` item, ``meta``, Orbax's metrics)."""
    registry = ocp.handlers.create_default_handler_registry(
        state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()
    )
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["val_loss"], best_mode="min")
    directory = Path(workdir).resolve() / "checkpoints"
    with ocp.CheckpointManager(directory, options=options, handler_registry=registry) as manager:
        host = jax.tree.map(np.asarray, state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta))
        manager.save(step, args=args, metrics={"val_loss": val_loss})


def test_params_are_an_item_of_their_own_read_without_the_optimizer(tmp_path):
    state = training_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(17, state, META)
    assert {"params", "state", "meta"} <= set(os.listdir(tmp_path / "checkpoints" / "17"))
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        # No target at all (the saved shapes; tuples come back as lists), or the params' shapes.
        untargeted = jax.tree.leaves(ckpt.restore_params())
        assert [a.tobytes() for a in untargeted] == [
            np.asarray(a).tobytes() for a in jax.tree.leaves(state["params"])
        ]
        params = ckpt.restore_params(17, jax.eval_shape(lambda: training_state()["params"]))
        assert_bitwise_equal(params, state["params"], "params, abstract target")
        wrong = {**state["params"], "encoder": (jnp.zeros(8), jnp.zeros(()), jnp.zeros(1))}
        with pytest.raises(CheckpointMismatch, match="missing in checkpoint"):
            ckpt.restore_params(17, wrong)


def test_checkpoints_of_the_old_layout_still_restore(tmp_path):
    """Parameters inside ``state``: training restores them, evaluation reads only them."""
    state = training_state()
    save_old_layout(tmp_path, 17, state, META, val_loss=1.5)
    assert "params" not in os.listdir(tmp_path / "checkpoints" / "17")
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.best_step() == 17
        params = ckpt.restore_params(target=jax.eval_shape(lambda: state["params"]))
        assert_bitwise_equal(params, state["params"], "old layout params")
    with Checkpointer(tmp_path) as ckpt:
        restored, meta = ckpt.restore(target=jax.eval_shape(training_state))
        assert_bitwise_equal(restored, state, "old layout state")
        assert meta == META
        ckpt.save(18, state, META)  # a resumed run goes on in the new layout
        assert ckpt.all_steps() == [17, 18]


def test_read_only_never_cleans_deletes_or_writes(tmp_path):
    """What evaluation opens while a trainer runs: the trainer's save in progress survives."""
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": np.arange(3.0)}, {})
    directory = tmp_path / "checkpoints"
    (directory / f"2{TMP_SUFFIX}" / "state").mkdir(parents=True)  # the trainer is saving
    (directory / DELETED_SUBDIR / "0").mkdir(parents=True)  # and about to empty its trash
    before = sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.all_steps() == [1]
        restored, _ = ckpt.restore(target={"x": np.zeros(3)})
        assert restored["x"].tolist() == [0.0, 1.0, 2.0]
        with pytest.raises(RuntimeError, match="read-only"):
            ckpt.save(3, {"x": np.arange(3.0)}, {}, force=True)
    assert sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) == before
    with Checkpointer(tmp_path / "none", read_only=True) as ckpt:
        assert ckpt.latest_step() is None
    assert not (tmp_path / "none").exists()


def _biggest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _data_files(folder: Path) -> list[Path]:
    """Every array data file of an item (OCDBT may keep them per process or merged at the top)."""
    return [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "truncated_array": lambda step: [_truncate(f) for f in _data_files(step / "params")],
    "deleted_array": lambda step: _biggest_file(step / "params").unlink(),
    "deleted_metadata": lambda step: (step / "params" / "_METADATA").unlink(),
    "truncated_meta": lambda step: _truncate(step / "meta" / "metadata"),
}


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_step_is_moved_aside_and_the_one_before_restores(tmp_path, damage, capfd):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, training_state(step), {"n": step})
    directory = tmp_path / "checkpoints"
    DAMAGE[damage](directory / "3")
    damaged = _tree_bytes(directory / "3")
    with Checkpointer(tmp_path, keep_last=1) as ckpt:
        step, state, meta = restore_newest(ckpt, lambda meta: jax.eval_shape(training_state))
        assert (step, meta) == (2, {"n": 2})
        assert_bitwise_equal(state, training_state(2), "fallback step")
        assert _tree_bytes(directory / CORRUPT_SUBDIR / "3") == damaged  # kept, byte for byte
        # Retention counts only intact steps: keep_last=1 keeps the new step 3, and step 2
        # goes only once the new step 3 is complete.
        assert ckpt.save(3, training_state(3), {"n": 3})
        assert ckpt.all_steps() == [3]
        assert_bitwise_equal(ckpt.restore(target=training_state(3))[0], training_state(3), "3")
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings[0].startswith(f"warning: checkpoint {directory / '3'} does not restore (")
    if damage == "truncated_meta":
        assert f"does not restore ({directory / '3' / 'meta' / 'metadata'}: " in warnings[0]
    assert warnings[1] == (
        f"warning: moved the damaged checkpoint of step 3 to {directory / CORRUPT_SUBDIR / '3'}"
    )
    assert "Traceback" not in err and "Event loop is closed" not in err


def test_no_intact_step_stops_and_moves_nothing(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, training_state(step), {"n": step})
    directory = tmp_path / "checkpoints"
    for step in (1, 2):
        _truncate(directory / str(step) / "meta" / "metadata")
    before = _tree_bytes(directory)
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(NoIntactCheckpoint, match=r"\(step 2: .*; step 1: .*\); nothing was"),
    ):
        restore_newest(ckpt, lambda meta: jax.eval_shape(training_state))
    assert _tree_bytes(directory) == before
    # A config change is not damage: it is raised, not moved aside.
    with Checkpointer(tmp_path / "ok") as ckpt:
        ckpt.save(1, training_state(1), {"n": 1})
        with pytest.raises(CheckpointMismatch):
            restore_newest(ckpt, lambda meta: {"params": {"other": jnp.zeros(2)}})
        assert ckpt.all_steps() == [1]


def _kill_lane(workdir: Path, delays: list[float], log: Path) -> list[dict]:
    """Run the worker once per delay and SIGKILL it ``delay`` seconds after a save starts.

    Returns, per run: the step it restored (after verifying every step on disk), the steps it
    finished saving, and the step whose save the kill interrupted (None if between saves).
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "tests.checkpoint_kill_worker", str(workdir)]
    runs = []
    for delay in delays:
        with log.open("a") as stderr:
            proc = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        watchdog = threading.Timer(300, proc.kill)  # never hang the suite; slow when loaded
        watchdog.start()
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert lines[0] == "opening", f"worker failed (see {log}): {lines}"
        lines = lines[1:]
        assert lines[1].startswith("saving "), f"worker failed (see {log}): {lines}"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        lines += [line.strip() for line in proc.stdout]
        assert proc.wait() == -signal.SIGKILL
        watchdog.cancel()
        restored = lines[0].removeprefix("restored ")
        saved = [int(line.split()[1]) for line in lines if line.startswith("saved ")]
        saving = [int(line.split()[1]) for line in lines if line.startswith("saving ")]
        runs.append(
            {
                "restored": None if restored == "none" else int(restored),
                "saved": saved,
                "in_flight": saving[-1] if saving[-1] not in saved else None,
            }
        )
    return runs


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_restorable_checkpoint(tmp_path):
    # 16 kill moments from 0 to 0.9 s after a save starts (a save takes ~0.2-0.8 s here, and the
    # worker saves back to back), interleaved over two independent workdirs that run side by
    # side to halve the wall time.
    delays = np.linspace(0.0, 0.9, 16).tolist()
    lanes = [tmp_path / "lane0", tmp_path / "lane1"]
    with ThreadPoolExecutor(len(lanes)) as pool:
        results = list(
            pool.map(
                lambda i: _kill_lane(lanes[i], delays[i :: len(lanes)], tmp_path / f"{i}.log"),
                range(len(lanes)),
            )
        )

    inside_save = 0
    for lane, runs in zip(lanes, results, strict=True):
        # After the last kill, a fresh Checkpointer here; after the others, the next worker run.
        with Checkpointer(lane, keep_last=KEEP_LAST) as ckpt:
            verify_all_steps(ckpt)
            latest = ckpt.latest_step()
            # A save after the restore works, and no leftovers of killed saves remain.
            assert ckpt.save(latest + 1, expected_state(latest + 1), expected_meta(latest + 1))
            assert listing(ckpt) == [str(s) for s in ckpt.all_steps()]
            state, _ = ckpt.restore(target=expected_state(latest + 1))
            assert_bitwise_equal(state, expected_state(latest + 1), f"{lane} new step")
        restored_after = [run["restored"] for run in runs[1:]] + [latest]
        for killed, restored in zip(runs, restored_after, strict=True):
            # The last finished save, or the one in flight if its rename got through.
            finished = killed["saved"][-1] if killed["saved"] else killed["restored"]
            assert restored in {finished, killed["in_flight"]}, (lane, killed, restored)
            inside_save += killed["in_flight"] is not None
        assert any(run["restored"] and run["saved"] for run in runs), "no save after a restore"
    assert inside_save >= 5, f"only {inside_save} of {len(delays)} kills landed inside a save"


@pytest.mark.slow
def test_sigkill_during_fallback_and_moving_aside_loses_nothing(tmp_path):
    """The newest step is damaged before each worker run; the worker falls back, moves it to
    ``corrupt/`` and goes on saving. It is killed at moments after it opened the checkpoints
    (inside the fallback, before the move), and once right after it reported the restore (the
    move done). After every kill the damaged step is in exactly one place, byte for byte, and
    the step before it restores."""
    workdir, log = tmp_path / "lane", tmp_path / "worker.log"
    with Checkpointer(workdir, keep_last=KEEP_LAST) as ckpt:
        for step in (1, 2):
            ckpt.save(step, expected_state(step), expected_meta(step))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "tests.checkpoint_kill_worker", str(workdir)]
    directory, outcomes = workdir / "checkpoints", []
    for delay in (0.0, 0.05, 0.2, 0.5, "restored"):
        with Checkpointer(workdir, read_only=True) as ckpt:
            newest = ckpt.latest_step()
        _truncate(_biggest_file(directory / str(newest) / "params"))
        damaged = _tree_bytes(directory / str(newest))
        corrupt_before = set(os.listdir(directory / CORRUPT_SUBDIR)) if outcomes else set()
        with log.open("a") as stderr:
            proc = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        watchdog = threading.Timer(300, proc.kill)
        watchdog.start()
        assert proc.stdout.readline().strip() == "opening", f"worker failed (see {log})"
        if delay == "restored":
            assert proc.stdout.readline().startswith("restored "), f"worker failed (see {log})"
        else:
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        watchdog.cancel()
        moved = (
            set(os.listdir(directory / CORRUPT_SUBDIR)) - corrupt_before
            if (directory / CORRUPT_SUBDIR).exists()
            else set()
        )
        in_place = (directory / str(newest)).exists() and not moved
        assert in_place or len(moved) == 1, (delay, moved)
        if moved:
            assert _tree_bytes(directory / CORRUPT_SUBDIR / moved.pop()) == damaged, delay
        else:
            assert _tree_bytes(directory / str(newest)) == damaged, delay
        outcomes.append("in place" if in_place else "moved")
        # What the next run (or the train loop) finds: an intact step, bitwise. It saves the
        # next step, so the next round has an intact step below the one it damages.
        with Checkpointer(workdir, keep_last=KEEP_LAST) as ckpt:
            step, state, _ = restore_newest(
                ckpt, lambda meta: expected_state(meta["data_position"] // 7)
            )
            assert_bitwise_equal(state, expected_state(step), f"after the kill at {delay} s")
            assert step >= newest - 1
            verify_all_steps(ckpt)
            ckpt.save(step + 1, expected_state(step + 1), expected_meta(step + 1))
    print("outcomes:", outcomes)
    assert "in place" in outcomes and "moved" in outcomes, outcomes


FULL_DISK_WORKER = """
import resource, signal, sys
import numpy as np
from research.train.checkpoint import Checkpointer, CheckpointWriteFailed
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(1, {"x": np.arange(1000, dtype=np.float32)}, {"n": 1})
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file over 1 MiB: full
    try:
        ckpt.save(2, {"x": np.arange(1 << 20, dtype=np.float32)}, {"n": 2})
    except CheckpointWriteFailed as error:
        print(error)
"""


def test_a_full_disk_is_one_line_and_the_steps_before_stay_intact(tmp_path):
    """A save that cannot write (here every file is capped at 1 MiB, as on a full disk): one
    message naming the step, no tracebacks, and the earlier step restores on the next start."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WORKER, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    directory = (tmp_path / "checkpoints").resolve()
    assert result.stdout.startswith(f"could not write checkpoint step 2 in {directory} (")
    assert "the steps saved before it are intact" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1]
        state, meta = ckpt.restore(target={"x": np.zeros(1000, np.float32)})
        assert state["x"].tobytes() == np.arange(1000, dtype=np.float32).tobytes()
        assert meta == {"n": 1}
    assert sorted(os.listdir(directory)) == ["1"]  # the partial save is gone
