"""Checkpoints of a LoRA run hold what trains: adapters, conditioning, optimizer state, and the
frozen base's hash. Resuming is bitwise exact; a different base is refused, naming both.

Runs the real training loop on the tiny config (4 host devices). References: the
uninterrupted run (bitwise), the base rebuilt from its source, the checkpoint's own files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from research.config import load_config
from research.eval.evaluate import load_run
from research.models.generator import param_group
from research.train import frozen_init
from research.train.checkpoint import Checkpointer
from research.train.loop import train

TINY = Path(__file__).parent / "configs" / "tiny.py"
STEPS = 3
LORA_RUN = (
    ("model.lora.rank", "4"),
    ("train.trainable", "('lora', 'conditioning')"),
    ("train.frozen_dtype", "bfloat16"),
    ("train.steps", str(STEPS)),
    ("train.learning_rate", "0.05"),
    ("train.checkpoint_every", "1"),
    ("train.keep_checkpoints", "3"),
    ("train.eval_every", "100"),
    ("train.tensorboard", "false"),
)


def _flat_paths(tree) -> list[tuple[str, ...]]:
    return [tuple(str(k) for k in p) for p in ocp.tree.to_flat_dict(tree)]


def test_checkpoints_hold_what_trains_and_resume_bitwise(tmp_path):
    cfg = load_config(TINY, LORA_RUN)
    full = tmp_path / "full"
    train(cfg, full)
    step_dir = full.resolve() / "checkpoints" / str(STEPS)
    with Checkpointer(full, read_only=True) as checkpoints:
        saved = checkpoints.restore_params(STEPS)
        meta = checkpoints.restore_meta(STEPS)
    groups = {param_group(p) for p in _flat_paths(saved)}
    assert groups == {"lora", "conditioning"}
    with ocp.StandardCheckpointer() as reader:
        state = reader.metadata(step_dir / "state").item_metadata.tree
    opt_leaves = ocp.tree.to_flat_dict(state["opt_state"])
    assert opt_leaves
    # Only the adapters' and the conditioning's moments (and step counters).
    for path, leaf in opt_leaves.items():
        if len(leaf.shape):
            names = tuple(str(k) for k in path)
            assert "lora_a" in names or "lora_b" in names or "decoder" not in names, path
    record = meta[frozen_init.META_KEY]["decoder"]
    assert record["init"] == "" and record["seed"] == cfg.seed and len(record["sha256"]) == 64

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    train(cfg, resumed)
    runs = [load_run(w, which="latest") for w in (full, resumed)]
    leaves = [jax.tree_util.tree_leaves_with_path(run.params) for run in runs]
    assert len(leaves[0]) > len(_flat_paths(saved))  # the base was rebuilt into the tree
    for (path, got), (_, want) in zip(leaves[1], leaves[0], strict=True):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), path
    kernel = runs[0].params["decoder"]["h_0"]["attn"]["c_attn"]
    assert kernel["kernel"].dtype == "bfloat16" and kernel["lora_b"].dtype == "float32"
    assert np.abs(np.asarray(kernel["lora_b"])).max() > 0


def _write_gpt2(folder: Path, seed: int) -> None:
    """A random GPT-2 of the tiny config's shape, written by transformers, with GPT-2's BPE."""
    import torch
    import transformers

    from research.data.tokenizers import decoder_tokenizer

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    decoder_tokenizer(None).save_pretrained(str(folder))


def test_a_different_base_is_refused_naming_both_hashes(tmp_path):
    folder, workdir = tmp_path / "gpt2", tmp_path / "run"
    _write_gpt2(folder, seed=0)
    overrides = (*LORA_RUN, ("init.decoder", str(folder)), ("train.steps", "1"))
    train(load_config(TINY, overrides), workdir)
    with Checkpointer(workdir, read_only=True) as checkpoints:
        record = checkpoints.restore_meta(1)[frozen_init.META_KEY]["decoder"]
    assert record["folder"] == str(folder)

    _write_gpt2(folder, seed=1)
    now = frozen_init.fingerprint(
        frozen_init.base_of({"decoder": frozen_init.load_source(str(folder), "decoder")}, "decoder")
    )
    assert now != record["sha256"]
    both = rf"sha256 {record['sha256'][:12]}.*sha256 {now[:12]}"
    with pytest.raises(frozen_init.FrozenSourceChanged, match=rf"^{folder}: .*{both}") as err:
        load_run(workdir, which="latest")
    assert "\n" not in str(err.value)
    with pytest.raises(frozen_init.FrozenSourceChanged, match=both):
        train(load_config(TINY, (*overrides, ("train.steps", "2"))), workdir)
