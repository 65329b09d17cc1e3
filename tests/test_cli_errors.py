"""Expected errors reach the user as one line on stderr naming the file, line or key, and an
exit code (2: bad input or config, 1: a diverged run); ``--debug`` shows the traceback
instead, and unexpected errors always keep theirs."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import jax
import numpy as np
import pytest

from research import assets, cli
from research.config import ConfigError, load_config
from research.models import hf
from research.models.gpt2 import GPT2Config, GPT2LMHead
from research.train import loop, step_metrics

TINY = str(Path(__file__).parent / "configs" / "tiny.py")


def one_line_error(capsys, argv: list[str], code: int, *names: str) -> str:
    """Run the CLI: it returns ``code`` and stderr is one ``error:`` line holding ``names``."""
    assert cli.main(argv) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def amazon_row(**fields) -> str:
    row = {"reviewerID": "A1", "asin": "B1", "overall": 5.0, "reviewText": "Fine strings."}
    return json.dumps({**row, "unixReviewTime": 1393545600, "summary": "Five", **fields})


def data_stats(path: Path, source: str) -> list[str]:
    overrides = [f"--config.data.source={source}", f"--config.data.path={path}"]
    return ["data", "stats", "--config", TINY, *overrides]


def test_bad_data_row(tmp_path, capsys):
    path = tmp_path / "reviews.json"
    path.write_text(amazon_row() + "\n" + amazon_row(overall="many") + "\n")
    one_line_error(capsys, data_stats(path, "amazon"), 2, f"{path}:2", "overall")


def test_truncated_gzip(tmp_path, capsys):
    path = tmp_path / "reviews.json.gz"
    whole = gzip.compress(("\n".join(amazon_row() for _ in range(50)) + "\n").encode())
    path.write_bytes(whole[: len(whole) // 2])
    one_line_error(capsys, data_stats(path, "amazon"), 2)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_refused_pickle(tmp_path, capsys):
    path = tmp_path / "reviews.pickle"
    path.write_bytes(pickle.dumps([{"user": "u", "template": _RunsCode()}]))
    one_line_error(capsys, data_stats(path, "pepler"), 2, str(path), "refused")


def tiny_gpt2_folder(folder: Path, **config_json) -> Path:
    """A 2-layer GPT-2 written by our save_pretrained, then its config.json edited."""
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=2, n_head=2)
    module = GPT2LMHead(config)
    params = module.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    hf.save_pretrained(folder, module, params)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **config_json}))
    return folder


@pytest.mark.parametrize(
    "config_json, names",
    [
        ({"n_layer": 1}, ["config.json does not have", "h.1."]),  # the file lies about depth
        ({"n_embd": "8"}, ["config.json", "n_embd='8' must be int"]),
        ({"n_head": 3}, ["config.json", "n_embd=8 must be divisible by n_head=3"]),
    ],
    ids=["fewer_layers", "string_size", "heads"],
)
def test_model_folder_that_disagrees_with_its_weights(tmp_path, capsys, config_json, names):
    folder = tiny_gpt2_folder(tmp_path / "gpt2", **config_json)
    argv = ["params", "--config", TINY, f"--config.init.decoder={folder}"]
    one_line_error(capsys, argv, 2, str(folder), *names)


def test_init_folder_of_the_other_kind(tmp_path, capsys):
    """A decoder folder given as the encoder: refused while the model is built, one line."""
    folder = tiny_gpt2_folder(tmp_path / "gpt2")
    argv = [
        "params",
        "--config",
        TINY,
        "--config.model.conditioning=prefix",
        f"--config.init.encoder={folder}",
        f"--config.data.encoder_tokenizer={assets.minilm_folder()}",
    ]
    one_line_error(capsys, argv, 2, f"init.encoder={str(folder)!r}", "holds a gpt2 model")


def test_init_encoder_from_a_run_without_one(tmp_path, capsys):
    """``init.encoder=run:DIR`` where that run (id_prompt conditioning) built no encoder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": load_config(TINY).to_dict()}))
    argv = ["params", "--config", TINY, "--config.model.conditioning=prefix"]
    argv.append(f"--config.init.encoder=run:{run}")
    one_line_error(capsys, argv, 2, f"init.encoder='run:{run}'", "has no encoder", "id_prompt")


def test_checkpoint_of_another_architecture(tmp_path, capsys, monkeypatch):
    from research.train.checkpoint import CheckpointMismatch

    def restore_fails(*args, **kwargs):
        raise CheckpointMismatch(f"checkpoint {tmp_path}/4: state.params.x is saved as f32[2]")

    monkeypatch.setattr(loop, "train", restore_fails)
    argv = ["train", "--config", TINY, "--workdir", str(tmp_path)]
    one_line_error(capsys, argv, 2, f"{tmp_path}/4", "state.params.x")


def test_diverged_run_exits_1(tmp_path, capsys, monkeypatch):
    def diverges(*args, **kwargs):
        raise step_metrics.TrainingDiverged("loss is nan at step 3; stopping. The last good ...")

    monkeypatch.setattr(loop, "train", diverges)
    argv = ["train", "--config", TINY, "--workdir", str(tmp_path)]
    one_line_error(capsys, argv, 1, "loss is nan at step 3")


@pytest.mark.parametrize(
    "override, names",
    [
        ("--config.train.learning_rate=1e400", ["train.learning_rate=inf", "finite"]),
        ("--config.model.decoder.n_layers=4", ["model.decoder.n_layers", "did you mean"]),
        ("--config.model.decoder.n_embd=33", ["model.decoder", "n_embd=33", "n_head=2"]),
        ("--config.model.encoder.hidden_dropout_prob=1.5", ["hidden_dropout_prob=1.5"]),
        ("--config.model.decoder.model_type=gemma", ["model.decoder.model_type", "gpt2"]),
    ],
    ids=["infinite", "unknown_key", "heads", "dropout", "family"],
)
def test_bad_model_config_on_the_command_line(override, names, capsys):
    one_line_error(capsys, ["config", "--config", TINY, override], 2, *names)


@pytest.mark.parametrize(
    "override, names",
    [
        ("--config.model.conditioning=prefix", ["model.conditioning='prefix'", "['none', 'id_"]),
        (
            "--config.model.rating_head=encoder",
            ["model.rating_head='encoder'", "'mf', 'mlp', 'dec"],
        ),
    ],
    ids=["conditioning", "rating_head"],
)
def test_an_encoder_with_no_input(override, names, capsys):
    """What reads the encoder needs data.encoder_input; the line lists what would work."""
    argv = ["config", "--config", TINY, "--config.data.encoder_input=none", override]
    one_line_error(capsys, argv, 2, "data.encoder_input='none'", "'user_item_history'", *names)


def test_unknown_model_key_in_a_config_file(tmp_path, capsys):
    """The typo the permissive reading used to train through (a 2-layer model, silently)."""
    path = tmp_path / "typo.py"
    path.write_text(
        "from research.config import default_config\n\n\n"
        "def get_config():\n"
        "    cfg = default_config()\n"
        "    cfg.model.decoder.n_layers = 4\n"
        "    return cfg\n"
    )
    argv = ["config", "--config", str(path)]
    one_line_error(capsys, argv, 2, "model.decoder.n_layers", "did you mean model.decoder.n_layer")


def test_text_that_is_not_unicode(tmp_path, capsys):
    """argv holds undecodable bytes as lone surrogates; refused before anything is loaded."""
    argv = ["generate", "--workdir", str(tmp_path / "none"), "--text", "caf\udce9"]
    one_line_error(capsys, argv, 2, "--text", "UTF-8")


def test_debug_shows_the_traceback(monkeypatch):
    argv = ["config", "--config", TINY, "--config.train.learning_rate=1e400"]
    with pytest.raises(ConfigError, match="finite"):
        cli.main([*argv, "--debug"])
    monkeypatch.setenv("RESEARCH_DEBUG", "1")
    with pytest.raises(ConfigError, match="finite"):
        cli.main(argv)


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(loop, "train", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", "--config", TINY, "--workdir", str(tmp_path)])
