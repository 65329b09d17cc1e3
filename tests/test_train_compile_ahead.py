"""The training loop compiles each stage's train step ahead of its first call and trims the heap
(``research.train.steps.compile_ahead``); training is bit for bit what it was without.

The reference is a second code path: the same run with ``compile_ahead`` taken out of the loop,
so that each step compiles inside its first call, as the loop did before. Two stages, so the
step the switch makes is compiled ahead too.
"""

from __future__ import annotations

import numpy as np

from research.config import load_config
from research.train import loop, steps
from research.train.run_log import read_metrics
from tests.test_train import TINY, assert_bitwise_equal, restore

OVERRIDES = {
    "train.steps": "5",
    "train.two_stage": "True",
    "train.stage1_max_steps": "2",  # stage 2 from step 2 on
    "train.eval_every": "2",
    "train.checkpoint_every": "5",
    "train.tensorboard": "false",
}


def test_steps_compiled_ahead_train_exactly_as_steps_compiled_by_their_first_call(
    tmp_path, monkeypatch
):
    cfg = load_config(TINY, OVERRIDES.items())
    compiled_ahead = []

    def counting(step, *args):
        compiled_ahead.append(step)
        steps.compile_ahead(step, *args)

    monkeypatch.setattr(loop, "compile_ahead", counting)
    loop.train(cfg, tmp_path / "ahead")
    monkeypatch.setattr(loop, "compile_ahead", lambda step, *args: None)
    loop.train(cfg, tmp_path / "first_call")

    assert len(set(compiled_ahead)) == len(compiled_ahead) == 2  # one step per stage
    ahead, first_call = read_metrics(tmp_path / "ahead"), read_metrics(tmp_path / "first_call")
    assert [row["split"] for row in ahead] == [row["split"] for row in first_call]
    for key in ("loss", "grad_norm"):
        got = [row.get(key, np.nan) for row in ahead]
        want = [row.get(key, np.nan) for row in first_call]
        np.testing.assert_array_equal(got, want, err_msg=key)
    step, state, _ = restore(tmp_path / "ahead")
    want_step, want_state, _ = restore(tmp_path / "first_call")
    assert step == want_step == 5
    assert_bitwise_equal(state, want_state, "the state after 5 steps")
