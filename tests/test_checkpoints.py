"""Checkpoint I/O: every layout loads, round trips through transformers, bad input is explained.

References: transformers' PyTorch models and safetensors' own reader, never our loader's
earlier output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from research.models import families, hf
from research.models.decoder_inputs import DecoderInputs
from research.models.gpt2 import GPT2Config, GPT2LMHead
from tests.conftest import GPT2_LAYOUTS, TINY_GPT2


def flat(params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def assert_bitwise_equal(a, b) -> None:
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def folder_with_tensors(src: Path, dst: Path, tensors: dict[str, np.ndarray]) -> Path:
    """``dst`` holding ``src``'s config.json and ``tensors`` as model.safetensors."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def tiny_tensors(tiny_gpt2_folder) -> dict[str, np.ndarray]:
    """The tiny GPT-2's tensors as transformers saved them, read by safetensors itself."""
    return load_file(str(tiny_gpt2_folder / "model.safetensors"))


# ---------------------------------------------------------------- loading and round trips


@pytest.mark.parametrize("layout", GPT2_LAYOUTS)
def test_every_layout_loads_pytorch_weights_exactly(layout, tiny_gpt2_folders, tiny_gpt2_torch):
    """Each layout gives float32 params equal to the PyTorch tensors, with no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing unexpected (e.g. the tied head)
        model, params = hf.load_pretrained(tiny_gpt2_folders[layout])
    assert isinstance(model, GPT2LMHead)
    assert model.config.n_layer == 2 and model.config.vocab_size == 1000
    state = tiny_gpt2_torch.transformer.state_dict()
    ours = flat(params)
    rows = hf.expand_table(families.family("gpt2").hf, model.config)
    assert len(ours) == len(rows)
    for hf_name, flax_path, _ in rows:  # GPT-2's Conv1D is stored [in, out], like Flax
        assert ours[flax_path].dtype == np.float32
        assert np.array_equal(ours[flax_path], state[hf_name].numpy()), hf_name


def test_gpt2_round_trip_through_transformers(tiny_gpt2, tiny_gpt2_torch, gpt2_batches, tmp_path):
    """load -> save_pretrained -> transformers from_pretrained: identical logits; loading our
    saved folder again gives bitwise-identical params."""
    model, params = tiny_gpt2
    hf.save_pretrained(tmp_path, model, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, local_files_only=True)
    reloaded.eval()
    ids, mask = gpt2_batches["left"]
    inputs = dict(input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask))
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, tiny_gpt2_torch(**inputs).logits)
    _, again = hf.load_pretrained(tmp_path)
    assert_bitwise_equal(again, params)


def test_bert_round_trip_through_transformers(minilm, minilm_torch, tmp_path):
    """MiniLM: load -> save_pretrained -> transformers BertModel gives identical outputs;
    loading our saved folder again gives bitwise-identical params."""
    model, params = minilm
    hf.save_pretrained(tmp_path, model, params)
    reloaded = transformers.BertModel.from_pretrained(tmp_path, local_files_only=True).eval()
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2307, 2833, 1012, 102]])
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long())
    with torch.no_grad():
        ours, theirs = reloaded(**inputs), minilm_torch(**inputs)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(ours.pooler_output, theirs.pooler_output)
    _, again = hf.load_pretrained(tmp_path)
    assert_bitwise_equal(again, params)


def test_save_refuses_params_transformers_cannot_hold(tiny_gpt2, tmp_path):
    """Cross-attention sublayers have no GPT2LMHeadModel tensor: saving says so, writes nothing."""
    model, _ = tiny_gpt2
    crossed = GPT2LMHead(model.config, cross_attention_every=1)
    ids = np.zeros((1, 4), np.int32)
    encoder = DecoderInputs(
        encoder_states=np.zeros((1, 2, 8), np.float32), encoder_mask=np.ones((1, 2))
    )
    shapes = jax.eval_shape(crossed.init, jax.random.key(0), ids, None, encoder)["params"]
    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(
        hf.CheckpointError, match=r"no Hugging Face gpt2 equivalent.*crossattention"
    ):
        hf.save_pretrained(tmp_path / "out", crossed, params)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_have_the_mode_of_any_new_file(umask, tiny_gpt2, tmp_path):
    """Like a file ``open()`` creates: 0o666 less the umask (no private temporary-file mode)."""
    model, params = tiny_gpt2
    previous = os.umask(umask)
    try:
        hf.save_pretrained(tmp_path / "out", model, params)
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    written = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in written] == ["config.json", "model.safetensors"]
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [expected, expected]


@pytest.mark.parametrize("torch_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_as_float32(torch_dtype, tiny_gpt2_torch, tmp_path):
    """float16 / bfloat16 checkpoints (bfloat16 has no numpy dtype) upcast exactly."""
    config = transformers.GPT2Config(**TINY_GPT2)
    half = transformers.GPT2LMHeadModel(config).to(torch_dtype)
    half.load_state_dict(tiny_gpt2_torch.state_dict())
    half.save_pretrained(tmp_path)
    _, params = hf.load_pretrained(tmp_path)
    ours = flat(params)
    for hf_name, flax_path, _ in hf.expand_table(
        families.family("gpt2").hf, GPT2Config(**TINY_GPT2)
    ):
        expected = half.transformer.state_dict()[hf_name].float().numpy()
        assert np.array_equal(ours[flax_path], expected), hf_name


# ---------------------------------------------------------------- bad folders and configs


def test_missing_folder(tmp_path):
    folder = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"model folder {re.escape(str(folder))} does not"):
        hf.load_pretrained(folder)


def test_folder_without_config(tiny_gpt2_folder, tmp_path):
    shutil.copy(tiny_gpt2_folder / "model.safetensors", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json not found.*needs config\.json"):
        hf.load_pretrained(tmp_path)


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "gpt2",\n  oops\n}')
    with pytest.raises(hf.CheckpointError, match=r"config\.json: invalid JSON at line 3"):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize("model_type", ["gemma", None])
def test_unsupported_model_type_lists_supported_ones(model_type, tmp_path):
    raw = {"model_type": model_type} if model_type else {"hidden_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    supported = sorted(families.family("gpt2") and families.FAMILIES)
    assert {"bert", "gpt2", "llama"} <= set(supported)
    expected = f"model_type={model_type!r} is not supported; supported: {supported}"
    with pytest.raises(hf.CheckpointError, match=re.escape(expected)):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"add_cross_attention": True}, "add_cross_attention=true checkpoints are not supported"),
        ({"activation_function": "swish"}, "activation_function='swish' is not supported; valid:"),
    ],
)
def test_gpt2_configs_we_cannot_compute(change, message, tiny_gpt2_folder, tmp_path):
    config = json.loads((tiny_gpt2_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=re.escape(message)):
        hf.load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
        ({"is_decoder": True}, "only BERT encoders are supported"),
        ({"hidden_act": "mish"}, "hidden_act='mish' is not supported; valid:"),
    ],
)
def test_bert_configs_we_cannot_compute(change, message, minilm_folder, tmp_path):
    config = json.loads((minilm_folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=re.escape(message)):
        hf.load_pretrained(tmp_path)


def test_folder_without_weights(tiny_gpt2_folder, tmp_path):
    shutil.copy(tiny_gpt2_folder / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds no weights: expected model\.safetensors"):
        hf.load_pretrained(tmp_path)


# ---------------------------------------------------------------- corrupt weight files


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"this is not the json header!!!!!"
    path.write_bytes(bytes(data))


def _replace_with_text(path: Path) -> None:
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")


@pytest.mark.parametrize("damage", [_truncate, _garble_header, _replace_with_text])
def test_corrupt_safetensors(damage, tiny_gpt2_folder, tmp_path):
    folder = Path(shutil.copytree(tiny_gpt2_folder, tmp_path / "copy"))
    damage(folder / "model.safetensors")
    path = re.escape(str(folder / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match=f"{path}: corrupt or truncated safetensors"):
        hf.load_pretrained(folder)


def test_truncated_shard_is_named(tiny_gpt2_folders, tmp_path):
    folder = Path(shutil.copytree(tiny_gpt2_folders["sharded"], tmp_path / "copy"))
    shard = sorted(folder.glob("model-*.safetensors"))[3]
    _truncate(shard)
    with pytest.raises(hf.CheckpointError, match=f"{re.escape(str(shard))}: corrupt or truncated"):
        hf.load_pretrained(folder)


def test_missing_shard_is_named(tiny_gpt2_folders, tmp_path):
    folder = Path(shutil.copytree(tiny_gpt2_folders["sharded"], tmp_path / "copy"))
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {re.escape(str(shard))} not found"):
        hf.load_pretrained(folder)


def test_index_listing_a_tensor_no_shard_holds(tiny_gpt2_folders, tmp_path):
    folder = Path(shutil.copytree(tiny_gpt2_folders["sharded"], tmp_path / "copy"))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["transformer.h.9.attn.c_attn.weight"] = index["weight_map"][
        "transformer.wte.weight"
    ]
    index_path.write_text(json.dumps(index))
    with pytest.raises(hf.CheckpointError, match=r"no shard holds: \['transformer\.h\.9\.attn"):
        hf.load_pretrained(folder)


def test_corrupt_pytorch_bin(tiny_gpt2_folders, tmp_path):
    folder = Path(shutil.copytree(tiny_gpt2_folders["pytorch_bin"], tmp_path / "copy"))
    _truncate(folder / "pytorch_model.bin")
    path = re.escape(str(folder / "pytorch_model.bin"))
    with pytest.raises(hf.CheckpointError, match=f"{path}: cannot read PyTorch weights"):
        hf.load_pretrained(folder)


class _Payload:
    """An arbitrary object: unpickling it could run code, so weights_only loading refuses."""


def test_pytorch_bin_holding_objects_is_refused(tiny_gpt2_folders, tmp_path):
    folder = Path(shutil.copytree(tiny_gpt2_folders["pytorch_bin"], tmp_path / "copy"))
    torch.save({"transformer.wte.weight": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(
        hf.CheckpointError, match="(?s)cannot read PyTorch weights.*Unsupported global"
    ):
        hf.load_pretrained(folder)


def test_pytorch_bin_without_torch_names_the_package(tiny_gpt2_folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    path = re.escape(str(tiny_gpt2_folders["pytorch_bin"] / "pytorch_model.bin"))
    with pytest.raises(hf.CheckpointError, match=f"{path} needs PyTorch.*pip install torch"):
        hf.load_pretrained(tiny_gpt2_folders["pytorch_bin"])


# ---------------------------------------------------------------- tensors that do not fit


def test_missing_tensor_is_named(tiny_gpt2_folder, tiny_tensors, tmp_path):
    tensors = dict(tiny_tensors)
    del tensors["transformer.h.1.mlp.c_fc.bias"], tensors["transformer.ln_f.weight"]
    folder = folder_with_tensors(tiny_gpt2_folder, tmp_path / "f", tensors)
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_pretrained(folder)
    assert "missing tensor h.1.mlp.c_fc.bias" in str(err.value)
    assert "missing tensor ln_f.weight" in str(err.value)
    assert str(folder) in str(err.value)


def test_shape_mismatch_names_parameter_and_both_shapes(tiny_gpt2_folder, tiny_tensors, tmp_path):
    tensors = {**tiny_tensors, "transformer.h.0.attn.c_attn.weight": np.zeros((64, 96), "f4")}
    folder = folder_with_tensors(tiny_gpt2_folder, tmp_path / "f", tensors)
    expected = (
        "h.0.attn.c_attn.weight has shape (64, 96), "
        "but parameter h_0/attn/c_attn/kernel needs (64, 192)"
    )
    with pytest.raises(hf.CheckpointError, match=re.escape(expected)):
        hf.load_pretrained(folder)


def test_bert_shape_mismatch_reports_flax_layout(minilm_folder, tmp_path):
    """A transposed Linear weight is reported in the Flax layout it was converted to."""
    tensors = load_file(str(minilm_folder / "model.safetensors"))
    name = "encoder.layer.2.intermediate.dense.weight"  # torch [1536, 384]
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    folder = folder_with_tensors(minilm_folder, tmp_path / "f", tensors)
    expected = (
        f"{name} has shape (1536, 384), "
        "but parameter encoder/layer_2/intermediate/dense/kernel needs (384, 1536)"
    )
    with pytest.raises(hf.CheckpointError, match=re.escape(expected)):
        hf.load_pretrained(folder)


def test_unexpected_tensors_warn_or_fail_when_strict(tiny_gpt2_folder, tiny_tensors, tmp_path):
    extra = {
        "transformer.h.0.attn.rotary.inv_freq": np.ones(8, "f4"),
        "score.weight": np.ones((2, 64), "f4"),
    }
    folder = folder_with_tensors(tiny_gpt2_folder, tmp_path / "f", {**tiny_tensors, **extra})
    message = (
        r"2 unexpected tensors not loaded: \['h\.0\.attn\.rotary\.inv_freq', 'score\.weight'\]"
    )
    with pytest.warns(UserWarning, match=message):
        _, params = hf.load_pretrained(folder)
    assert "h_0" in params  # still loaded
    with pytest.raises(hf.CheckpointError, match=message):
        hf.load_pretrained(folder, strict=True)


def test_untied_lm_head_is_reported(tiny_gpt2_folder, tiny_tensors, tmp_path):
    """Our head is tied to wte; a different lm_head.weight would be silently lost otherwise."""
    head = tiny_tensors["transformer.wte.weight"] + 1.0
    folder = folder_with_tensors(
        tiny_gpt2_folder, tmp_path / "f", {**tiny_tensors, "lm_head.weight": head}
    )
    with pytest.warns(UserWarning, match=r"1 unexpected tensors not loaded: \['lm_head\.weight'\]"):
        hf.load_pretrained(folder)
