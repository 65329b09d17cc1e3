"""The command line: every subcommand's help, and ``research config``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from research import cli
from research.config import load_config

TINY = str(Path(__file__).parent / "configs" / "tiny.py")


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every leaf subcommand of the parser, e.g. "train" and "data stats"."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        return [prefix.strip()]
    return [
        name
        for choice, sub in actions[0].choices.items()
        for name in _subcommands(sub, f"{prefix}{choice} ")
    ]


SUBCOMMANDS = _subcommands(cli._parser())


def test_the_subcommand_list_is_read_from_the_parser():
    assert {"train", "ablate", "config", "data stats"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_lists_options_and_overrides(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--config.KEY=VALUE" in out and "options:" in out


def test_config_prints_file_plus_overrides(capsys):
    assert cli.main(["config", "--config", TINY, "--config.train.steps=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "train.steps=3" in lines
    assert "model.conditioning='id_prompt'" in lines  # from the file, not the defaults
    assert "model.decoder.n_embd=32" in lines


def test_config_prints_a_runs_config(tmp_path, capsys):
    cfg = load_config(TINY, [("train.learning_rate", "0.5")])
    (tmp_path / "run.json").write_text(json.dumps({"config": cfg.to_dict()}))
    assert cli.main(["config", "--workdir", str(tmp_path), "--config.seed=7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "train.learning_rate=0.5" in lines and "seed=7" in lines


def test_a_run_recorded_before_newer_keys_gets_their_defaults(tmp_path, capsys):
    saved = load_config(TINY).to_dict()
    del saved["eval"]["subset_seed"], saved["sampling"]["repetition_penalty"]
    (tmp_path / "run.json").write_text(json.dumps({"config": saved}))
    assert cli.main(["config", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "eval.subset_seed=0" in lines and "sampling.repetition_penalty=1.0" in lines
    assert "model.decoder.n_embd=32" in lines  # the saved values stay


def test_config_names_a_bad_key(capsys):
    assert cli.main(["config", "--config", TINY, "--config.train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


def test_a_file_of_only_bad_rows_stops_train_with_one_line_before_training(tmp_path, capsys):
    data = tmp_path / "reviews.jsonl"
    row = {"user": "u", "item": "i", "text": "Good.", "when": "Sun Jul 30 07:44:10 -0700 2017"}
    data.write_text((json.dumps(row) + "\n") * 3)
    argv = ["train", "--config", TINY, "--workdir", str(tmp_path / "run")]
    overrides = [
        "--config.data.source=jsonl",
        f"--config.data.path={data}",
        "--config.data.columns.rating=",
        "--config.data.columns.timestamp=when",
        "--config.data.on_bad_row=skip",
    ]
    assert cli.main(argv + overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {data}: every row is bad, nothing to train on; 3 rows read")
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "checkpoints").exists()
