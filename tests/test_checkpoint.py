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
import pytest

from research.train.checkpoint import DELETED_SUBDIR, Checkpointer
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
        lines = [proc.stdout.readline().strip(), proc.stdout.readline().strip()]
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
