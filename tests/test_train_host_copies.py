"""The training loop copies the train state to the host only for a checkpoint it writes.

A test double around ``jax.device_get`` records every device-to-host copy of the state (the
dict holding ``opt_state``); the reference is the list of checkpoints found on disk afterwards.
"""

from __future__ import annotations

from pathlib import Path

import jax

from research.config import load_config
from research.train import loop
from research.train.checkpoint import Checkpointer

TINY = Path(__file__).resolve().parent / "configs" / "tiny.py"


def test_state_reaches_the_host_only_when_a_checkpoint_is_written(tmp_path, monkeypatch):
    overrides = {
        "train.steps": "7",
        "train.checkpoint_every": "3",
        "train.keep_checkpoints": "5",
        "train.log_every": "2",
        "train.eval_every": "100",
        "train.tensorboard": "false",
    }
    cfg = load_config(TINY, overrides.items())
    copied_steps = []
    real_device_get = jax.device_get

    def recording_device_get(tree):
        host = real_device_get(tree)
        if isinstance(tree, dict) and "opt_state" in tree:
            copied_steps.append(int(host["step"]))
        return host

    monkeypatch.setattr(jax, "device_get", recording_device_get)
    loop.train(cfg, tmp_path / "run")
    with Checkpointer(tmp_path / "run") as checkpoints:
        written = checkpoints.all_steps()
    assert written == [3, 6, 7]
    assert copied_steps == written
