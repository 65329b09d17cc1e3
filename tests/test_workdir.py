"""A workdir never loses what it holds: one trainer at a time, an append-only run record,
resumes that fall back past a damaged checkpoint, torn metrics lines.

Every case runs the real ``research train`` command line (in this process, on the tiny config)
against a copy of one finished run and checks two things: the one-line message, and that
nothing was lost (the byte-identical ``run.json``, every metrics row, every checkpoint, moved
or not). The references are the finished run's files as they were before the case ran.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from research import cli
from research.config import load_config
from research.eval.evaluate import run_config
from research.train.checkpoint import Checkpointer
from research.train.checkpoint_damage import CORRUPT_SUBDIR
from research.train.frozen_init import FrozenSourceChanged
from research.train.run_log import read_metrics, structural_hash
from tests.conftest import code_mappings

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.py"
STEPS = 3
# A checkpoint after every step, all kept: steps 1, 2, 3.
RUN = (
    ("train.steps", str(STEPS)),
    ("train.checkpoint_every", "1"),
    ("train.keep_checkpoints", "3"),
    ("train.eval_every", "100"),
    ("train.tensorboard", "False"),
)


def train_steps(workdir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(workdir) if row["split"] == "train"]


def train_argv(workdir: Path, overrides=RUN, *extra: str) -> list[str]:
    args = [f"--config.{key}={value}" for key, value in overrides]
    return ["train", "--config", str(TINY), "--workdir", str(workdir), *args, *extra]


def snapshot(workdir: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file in the workdir except the lock file."""
    return {
        str(path.relative_to(workdir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(workdir.rglob("*"))
        if path.is_file() and path.name != "train.lock"
    }


def one_error_line(err: str) -> str:
    """The message, which must be exactly one line after "error: " (warnings may precede)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("workdir") / "finished"
    assert cli.main(train_argv(workdir)) == 0
    return workdir


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A fresh copy of the finished run (cases damage or extend it)."""
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    return workdir


def test_rerun_of_a_finished_run_changes_nothing(run, capsys):
    before = snapshot(run)
    assert cli.main(train_argv(run)) == 0
    assert f"already complete at step {STEPS}" in capsys.readouterr().out
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "override, key",
    [("model.decoder.n_embd", "64"), ("train.learning_rate", "0.5")],
    ids=["architecture", "learning_rate"],
)
def test_changed_structural_key_is_refused_before_anything_is_written(run, capsys, override, key):
    """A finished run rerun with another architecture or learning rate: refused naming the
    key (checked before "already complete"); run.json and everything else unchanged, and
    evaluation still reads the original config."""
    before = snapshot(run)
    original = run_config(run).to_dict()
    argv = train_argv(run, (*RUN, (override, key)))
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run / 'run.json'}: this config differs from the run's in {override}," in line
    assert snapshot(run) == before
    assert run_config(run).to_dict() == original


def test_extension_is_appended_to_the_record_and_resumes(run, capsys):
    record = json.loads((run / "run.json").read_text())
    assert cli.main(train_argv(run, (*RUN, ("train.steps", str(STEPS + 1))))) == 0
    assert f"Resuming {run} from step {STEPS} " in capsys.readouterr().out
    after = json.loads((run / "run.json").read_text())
    assert {k: v for k, v in after.items() if k != "invocations"} == record  # the original
    (entry,) = after["invocations"]
    assert entry["kind"] == "train" and entry["changed"] == {"train.steps": STEPS + 1}
    assert f"--config.train.steps={STEPS + 1}" in entry["command"]
    assert run_config(run).train.steps == STEPS + 1  # evaluation sees the extended run
    assert train_steps(run) == list(range(1, STEPS + 2))
    with Checkpointer(run, read_only=True) as checkpoints:
        meta = checkpoints.restore_meta(STEPS + 1)
    assert meta["config_hash"] == structural_hash(load_config(TINY, RUN))


def test_checkpoint_of_another_config_is_refused_by_its_hash(run, capsys):
    """Without run.json to compare with, the checkpoint's config hash still catches a change."""
    (run / "run.json").unlink()
    before = snapshot(run)
    argv = train_argv(run, (*RUN, ("train.steps", "9"), ("train.learning_rate", "0.5")))
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"checkpoint {run.resolve() / 'checkpoints' / str(STEPS)} was written under" in line
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != "run.json"} == before


def test_second_trainer_exits_at_once_naming_the_holder(run, capsys):
    """A trainer (here a process holding the lock) owns the workdir: a second one stops with
    the holder's PID and host; once the holder is gone (killed: no clean-up) the lock is free."""
    from research.train.workdir_lock import trainer_lock  # noqa: F401 (the holder imports it)

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, pathlib, time\n"
            "from research.train.workdir_lock import trainer_lock\n"
            "with trainer_lock(pathlib.Path(sys.argv[1])):\n"
            "    print('locked', flush=True); time.sleep(120)",
            str(run),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        assert cli.main(train_argv(run, (*RUN, ("train.steps", str(STEPS + 1))))) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{run} is already being trained by pid {holder.pid} on host {os.uname()[1]}" in line
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(train_argv(run)) == 0  # a killed holder leaves no stale lock
    assert "already complete" in capsys.readouterr().out


def biggest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "truncated_params": lambda step: truncate(biggest_file(step / "params")),
    "deleted_state_array": lambda step: biggest_file(step / "state" / "ocdbt.process_0").unlink(),
    "truncated_meta": lambda step: truncate(step / "meta" / "metadata"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_is_kept_aside(run, capsys, damage):
    newest = run / "checkpoints" / str(STEPS)
    DAMAGE[damage](newest)
    damaged = snapshot(newest)
    rows = read_metrics(run)
    assert cli.main(train_argv(run, (*RUN, ("train.steps", str(STEPS + 1))))) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert warnings[0].startswith(f"warning: checkpoint {newest.resolve()} does not restore ("), (
        captured.err
    )
    assert "Traceback" not in captured.err and "Event loop is closed" not in captured.err
    assert f"Resuming {run} from step {STEPS - 1} " in captured.out
    # The damaged step is kept, byte for byte, and a new intact step 3 (and 4) replaced it.
    assert snapshot(run / "checkpoints" / CORRUPT_SUBDIR / str(STEPS)) == damaged
    with Checkpointer(run, read_only=True) as checkpoints:
        assert checkpoints.all_steps() == [STEPS - 1, STEPS, STEPS + 1]
    assert train_steps(run) == list(range(1, STEPS + 2))
    assert read_metrics(run)[: STEPS - 1] == rows[: STEPS - 1]  # (steps 1, 2: train only)


def test_no_intact_checkpoint_stops_in_one_line_and_moves_nothing(run, capsys):
    for step in range(1, STEPS + 1):
        truncate(run / "checkpoints" / str(step) / "meta" / "metadata")
    before = snapshot(run)
    before.pop("run.json")  # the resume is recorded before the checkpoints are read
    assert cli.main(train_argv(run, (*RUN, ("train.steps", str(STEPS + 1))))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"no checkpoint in {run.resolve() / 'checkpoints'} restores (step {STEPS}: " in line
    assert "nothing was moved or deleted" in line
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k != "run.json"} == before


def test_torn_last_metrics_line_is_dropped_with_a_warning(run, capsys):
    path = run / "metrics.jsonl"
    rows = read_metrics(run)
    with path.open("a") as f:
        f.write('{"step": 4, "split": "tr')  # disk full or power cut mid-append
    assert cli.main(train_argv(run, (*RUN, ("train.steps", str(STEPS + 1))))) == 0
    assert f"warning: {path}: dropped a partial last line" in capsys.readouterr().err
    assert read_metrics(run)[: len(rows)] == rows
    assert train_steps(run) == list(range(1, STEPS + 2))


def test_evaluation_reads_the_parameters_alone_also_from_old_layout_checkpoints(run, tmp_path):
    """``load_run`` (evaluate, generate, export) builds no optimizer: the parameters of the
    same step come back bitwise equal from today's layout and from the old one (parameters
    inside ``state``), written here by a frozen copy of the old save."""
    import orbax.checkpoint as ocp

    from research.eval.evaluate import load_run
    from tests.test_checkpoint import save_old_layout

    step_dir = run.resolve() / "checkpoints" / str(STEPS)
    with ocp.StandardCheckpointer() as reader:
        state = {
            "params": reader.restore(step_dir / "params"),
            **reader.restore(step_dir / "state"),
        }
    with Checkpointer(run, read_only=True) as checkpoints:
        meta = checkpoints.restore_meta(STEPS)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(run / "run.json", old / "run.json")
    save_old_layout(old, STEPS, state, meta, val_loss=1.0)
    assert not (old / "checkpoints" / str(STEPS) / "params").exists()
    before = snapshot(old)
    new_run, old_run = load_run(run, which="latest"), load_run(old, which="latest")
    assert old_run.step == new_run.step == STEPS
    new_leaves = jax.tree_util.tree_leaves_with_path(new_run.params)
    old_leaves = jax.tree_util.tree_leaves_with_path(old_run.params)
    assert [path for path, _ in old_leaves] == [path for path, _ in new_leaves]
    for (path, got), (_, want) in zip(old_leaves, new_leaves, strict=True):
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), path
    assert snapshot(old) == before  # read-only


# ----------------------------------------------------------------------------- frozen from init


@pytest.fixture
def frozen_encoder_folder(tmp_path, minilm_folder) -> Path:
    """A tiny random BERT written by transformers, with MiniLM's tokenizer files beside it."""
    import torch
    import transformers

    folder = tmp_path / "tiny_bert"
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    transformers.BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_folder / name).exists():
            shutil.copy(minilm_folder / name, folder / name)
    return folder


def test_frozen_init_encoder_is_left_out_and_resume_stays_exact(frozen_encoder_folder, tmp_path):
    """The encoder trains in no stage and comes whole from ``init.encoder``: no checkpoint
    holds it (nor optimizer state for it), resuming is bitwise exact, evaluation loads it from
    the folder, and a changed folder is an error naming it."""
    import orbax.checkpoint as ocp

    from research.eval.evaluate import load_run
    from research.train.frozen_init import load_source

    folder = frozen_encoder_folder
    overrides = (
        *RUN,
        ("model.conditioning", "prefix"),
        ("init.encoder", str(folder)),
        ("train.trainable", "('decoder', 'conditioning')"),
    )
    full = tmp_path / "full"
    assert cli.main(train_argv(full, overrides)) == 0
    step_dir = full.resolve() / "checkpoints" / str(STEPS)
    with Checkpointer(full, read_only=True) as checkpoints:
        params = checkpoints.restore_params(STEPS)
        meta = checkpoints.restore_meta(STEPS)
    assert sorted(params) == ["conditioning_prefix", "decoder"]
    recorded = meta["frozen_from_init"]["encoder"]
    assert recorded["folder"] == str(folder) and len(recorded["sha256"]) == 64
    with ocp.StandardCheckpointer() as reader:
        opt_paths = ocp.tree.to_flat_dict(reader.metadata(step_dir / "state").item_metadata.tree)
    assert opt_paths and not [path for path in opt_paths if "encoder" in path]

    # Resumed from step 2: step 3 bitwise equal to the uninterrupted run's.
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    assert cli.main(train_argv(resumed, overrides)) == 0
    runs = {
        name: load_run(workdir, which="latest")
        for name, workdir in (("full", full), ("resumed", resumed))
    }
    source = load_source(str(folder), "encoder")
    for run in runs.values():
        assert run.step == STEPS
        assert sorted(run.params) == ["conditioning_prefix", "decoder", "encoder"]
    flat = {name: jax.tree_util.tree_leaves_with_path(run.params) for name, run in runs.items()}
    for (path, got), (_, want) in zip(flat["resumed"], flat["full"], strict=True):
        assert (
            got.dtype == want.dtype and np.asarray(got).tobytes() == np.asarray(want).tobytes()
        ), path
    for (path, got), (_, want) in zip(
        jax.tree_util.tree_leaves_with_path(runs["full"].params["encoder"]),
        jax.tree_util.tree_leaves_with_path(source),
        strict=True,
    ):
        assert np.asarray(got).tobytes() == want.tobytes(), path

    # The folder's weights change: resuming and evaluating both refuse, naming the folder.
    import torch
    import transformers

    torch.manual_seed(1)
    transformers.BertModel(transformers.BertConfig.from_pretrained(folder)).save_pretrained(folder)
    with pytest.raises(
        FrozenSourceChanged, match=rf"^{re.escape(str(folder))}: checkpoint .* left out the encoder"
    ):
        load_run(full, which="latest")
    before = snapshot(full)
    assert cli.main(train_argv(full, (*overrides, ("train.steps", str(STEPS + 1))))) == 2
    assert snapshot(full).keys() - {"run.json"} == before.keys() - {"run.json"}


def test_runs_in_one_process_leave_no_compiled_code_behind(tmp_path):
    """A run frees its compiled steps when it ends: JAX's pmap cache would keep each run's
    executables, and their code mappings, until ``mmap`` failed at ``vm.max_map_count``
    (an in-process ablation or test suite aborted there)."""
    mappings = []
    for seed in range(3):
        assert cli.main(train_argv(tmp_path / str(seed), (*RUN, ("seed", str(seed))))) == 0
        gc.collect()
        mappings.append(code_mappings())
    # A tiny run's steps map about 500 regions; the first run also loads libraries.
    assert mappings[2] - mappings[0] < 50, mappings
