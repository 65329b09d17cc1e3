"""``research export --adapters``: PEFT loads our LoRA adapters onto transformers' GPT-2.

Reference: transformers' PyTorch GPT-2 (the run's base folder) with the adapters loaded by
``peft.PeftModel.from_pretrained``, against our unmerged model's logits.
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from research import cli
from research.config import load_config
from research.eval.evaluate import load_run
from research.export import load_export
from research.models import hf
from research.models.decoder_inputs import DecoderInputs
from research.models.generator import Generator
from research.train.loop import train

from .test_lora_checkpoints import LORA_RUN, TINY, _write_gpt2


def test_peft_loads_our_adapters_onto_gpt2(tmp_path):
    folder, workdir, out = tmp_path / "gpt2", tmp_path / "run", tmp_path / "adapters"
    _write_gpt2(folder, seed=0)
    overrides = (
        *LORA_RUN,
        ("init.decoder", str(folder)),
        ("train.frozen_dtype", "float32"),  # PEFT's base is the float32 folder
        ("train.steps", "2"),
    )
    train(load_config(TINY, overrides), workdir)
    argv = ["export", "--workdir", str(workdir), "--out", str(out), "--adapters"]
    assert cli.main(argv) == 0

    adapter_config = json.loads((out / "decoder" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert adapter_config["fan_in_fan_out"] is True  # GPT-2's Conv1D
    assert adapter_config["target_modules"] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
    ]
    tensors = load_file(str(out / "decoder" / "adapter_model.safetensors"))
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)
    assert (out / "conditioning.safetensors").is_file()

    run = load_run(workdir, which="latest")
    ids = np.asarray(next(iter(run.dataset.eval_iterator("test", 8)))["decoder_ids"])
    ours = run.model.apply(
        {"params": run.params}, ids, np.ones_like(ids), DecoderInputs(), method=Generator.decode
    )
    base = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        plain = base(input_ids=torch.as_tensor(ids).long()).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, out / "decoder").eval()
    with torch.no_grad():
        theirs = adapted(input_ids=torch.as_tensor(ids).long()).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=0)
    assert np.abs(plain - theirs).max() > 1e-3  # the adapters were loaded and matter

    with pytest.raises(hf.CheckpointError, match="holds LoRA adapters only"):
        load_export(out)
