"""``research export`` and ``init.decoder=run:WORKDIR``, on one tiny trained run.

The run conditions on the encoder (prefix MLP, cross-attention sublayers inside the decoder) and on
the user/item ids, so every kind of parameter has to land somewhere. References: transformers'
PyTorch models read from the export (logits, hidden states, tokenizer ids) and the run's own
checkpoint read by ``load_run`` (the second code path every round trip is compared with).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from research import cli
from research.config import load_config
from research.data import tokenizers
from research.eval.evaluate import load_run
from research.export import CONDITIONING_FILE, MANIFEST, export_run, load_export
from research.models.bert import BertEncoder
from research.models.build import build_generator
from research.models.gpt2 import GPT2LMHead
from research.train import frozen_init
from research.train.loop import train

from .conftest import apply_model

TINY = Path(__file__).parent / "configs" / "tiny.py"
RUN = (
    ("model.conditioning", "prefix+cross_attention+id_prompt"),
    ("train.steps", "3"),
    ("train.warmup_steps", "0"),
    ("train.schedule", "constant"),
    ("train.learning_rate", "0.05"),  # big steps: every tensor moves away from its init
    ("train.eval_every", "3"),
    ("train.checkpoint_every", "3"),
    ("train.tensorboard", "false"),
)


def _flat(tree) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(workdir, LoadedRun)`` of the tiny run, trained for 3 steps."""
    workdir = tmp_path_factory.mktemp("export_run") / "run"
    train(load_config(TINY, RUN), workdir)
    return workdir, load_run(workdir)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    export_run(trained[0], out)
    return out


def _batch(run):
    batch = next(iter(run.dataset.eval_iterator("test", 8)))
    return {k: v for k, v in batch.items() if k != "example"}


def test_decoder_folder_gives_our_logits_in_transformers(trained, exported):
    _, run = trained
    decoder = run.model.spec.decoder
    own = {k: v for k, v in run.params["decoder"].items()}
    for block in own:
        if isinstance(own[block], dict):
            own[block] = {
                k: v for k, v in own[block].items() if k not in ("crossattention", "ln_cross_attn")
            }
    ids = np.asarray(_batch(run)["decoder_ids"])
    ours = np.asarray(apply_model(GPT2LMHead(decoder), own, ids))
    reference = transformers.GPT2LMHeadModel.from_pretrained(exported / "decoder").eval()
    with torch.no_grad():
        theirs = reference(input_ids=torch.as_tensor(ids).long()).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    text = "Great strings, warm tone; they stay in tune."
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported / "decoder")
    assert hf_tokenizer(text)["input_ids"] == tokenizers.gpt2_tokenizer()(text)["input_ids"]
    assert hf_tokenizer.eos_token_id == decoder.eos_token_id


def test_encoder_folder_gives_our_states_in_transformers(trained, exported):
    _, run = trained
    batch = _batch(run)
    ids, mask = np.asarray(batch["encoder_ids"]), np.asarray(batch["encoder_mask"])
    ours = apply_model(BertEncoder(run.model.spec.encoder), run.params["encoder"], ids, mask)
    reference = transformers.BertModel.from_pretrained(exported / "encoder").eval()
    with torch.no_grad():
        out = reference(
            input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long()
        )
    keep = mask.astype(bool)  # padded positions are free to differ
    np.testing.assert_allclose(
        np.asarray(ours.last_hidden_state)[keep],
        out.last_hidden_state.numpy()[keep],
        atol=2e-4,
        rtol=1e-4,
    )
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported / "encoder")
    text = "warm tone"
    assert hf_tokenizer(text)["input_ids"] == tokenizers.encoder_tokenizer()(text)["input_ids"]


def test_export_alone_restores_the_run(trained, exported):
    _, run = trained
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["parts"] == ["decoder", "encoder"]
    conditioning = set(manifest["conditioning"])
    assert "conditioning_prefix/hidden/kernel" in conditioning
    assert "conditioning_id_prompt/user/embedding" in conditioning
    assert "decoder/h_0/crossattention/c_attn/kernel" in conditioning
    restored = load_export(exported)
    assert restored.users == run.dataset.users and restored.items == run.dataset.items
    assert restored.model.spec == run.model.spec
    ours, theirs = _flat(run.params), _flat(restored.params)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
    batch = _batch(run)
    np.testing.assert_array_equal(
        np.asarray(apply_model(restored.model, restored.params, batch)),
        np.asarray(apply_model(run.model, run.params, batch)),
    )


def _new_run_decoder(run, init_decoder: str) -> dict[str, np.ndarray]:
    cfg = load_config(TINY, (("model.conditioning", "none"), ("init.decoder", init_decoder)))
    model, params = build_generator(
        cfg, run.dataset.num_users, run.dataset.num_items, jax.random.key(7)
    )
    assert model.spec.decoder == run.model.spec.decoder
    return _flat(params["decoder"])


@pytest.mark.parametrize("source", ["export", "run"])
def test_new_run_starts_from_the_decoder(trained, exported, source):
    workdir, run = trained
    init = str(exported / "decoder") if source == "export" else f"run:{workdir}"
    started = _new_run_decoder(run, init)
    trained_decoder = {k: v for k, v in _flat(run.params["decoder"]).items() if "cross" not in k}
    assert started.keys() == trained_decoder.keys()
    for key, value in trained_decoder.items():
        np.testing.assert_array_equal(started[key], value, err_msg=key)


def test_frozen_part_from_a_run_is_read_back_from_that_run(trained):
    # A checkpoint leaves out a part frozen from init.* and reloads it from there on restore.
    workdir, run = trained
    reloaded = _flat(frozen_init.load_source(f"run:{workdir}", "encoder"))
    expected = _flat(run.params["encoder"])
    assert reloaded.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(reloaded[key], value, err_msg=key)


def test_run_source_errors_name_the_problem(trained, tmp_path):
    record = json.loads((trained[0] / "run.json").read_text())
    record["config"]["model"]["conditioning"] = "none"
    language_model = tmp_path / "lm"
    language_model.mkdir()
    (language_model / "run.json").write_text(json.dumps(record))
    prefix = (("model.conditioning", "prefix"),)
    cfg = load_config(TINY, (*prefix, ("init.encoder", f"run:{language_model}")))
    with pytest.raises(ValueError, match="has no encoder"):
        build_generator(cfg, 3, 3)
    with pytest.raises(FileNotFoundError, match="run.json not found; train that run first"):
        load_config(TINY, (*prefix, ("init.decoder", f"run:{tmp_path / 'nothing'}")))


def test_nonempty_out_is_refused_unless_forced(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["export", "--workdir", str(trained[0]), "--out", str(out)]
    assert cli.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "not empty" in errors[0] and "--force" in errors[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert cli.main([*argv, "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["decoder", "encoder", CONDITIONING_FILE, MANIFEST]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in (out, *out.rglob("*")))  # shareable


def test_workdir_without_checkpoints_is_one_line(trained, tmp_path, capsys):
    workdir = tmp_path / "untrained"
    workdir.mkdir()
    (workdir / "run.json").write_text((trained[0] / "run.json").read_text())
    out = tmp_path / "out"
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: no checkpoint in")
    assert not out.exists()
