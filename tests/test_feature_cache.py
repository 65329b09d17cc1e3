"""Frozen-encoder feature cache: cached training equals live training; stale or broken caches
are never read.

References: the same train steps, evaluation and greedy decoding with the encoder run live
(its dropout is off on both paths: it is frozen), and a cache built from scratch in a fresh
folder. Tiny model (tests/configs/tiny.py, 1-layer encoder from scratch), in process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from research import assets
from research.config import load_config
from research.data.pipeline import load_dataset
from research.eval import evaluate
from research.sampling import generate_batches
from research.train import feature_cache, loop
from research.train.steps import init_state, replicate, shard
from research.train.trainer import Trainer

TINY = Path(__file__).resolve().parent / "configs" / "tiny.py"
FROZEN = "('decoder', 'conditioning')"


def tiny_config(tmp_path: Path, conditioning: str, **overrides: str):
    settings = {
        "model.conditioning": conditioning,
        "train.trainable": FROZEN,
        "cache.features_dir": str(tmp_path / "features"),
        "train.tensorboard": "false",
        **overrides,
    }
    return load_config(TINY, settings.items())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_dataset(tiny_config(tmp_path_factory.mktemp("cfg"), "prefix").data)


def losses(trainer: Trainer, tx, raw_batches) -> list[float]:
    """Two train steps' losses (dropout on in the decoder), then the validation loss."""
    devices = trainer.devices
    step = trainer.train_step(2, tx)
    seed = replicate(trainer.dropout_seed, devices)
    state = replicate(init_state(trainer.initial_params, tx), devices)
    out = []
    for raw in raw_batches:
        state, metrics = step(state, shard(trainer.host_batch(raw, "train"), devices, 1), seed)
        out.append(float(metrics["loss"][0]))
    return [*out, trainer.evaluate(state["params"])["loss"]]


# One case per kind of cache: "pooled" (additive; prefix pools the same Sources through the same
# ``pool``) and "states", read by cross-attention and, pooled, by prefix next to id_prompt: each
# case compiles its train and eval steps twice (live, cached), the slowest tests of this file.
@pytest.mark.parametrize("conditioning", ["additive", "prefix+cross_attention+id_prompt"])
def test_cached_features_train_and_evaluate_like_the_live_encoder(conditioning, dataset, tmp_path):
    cfg = tiny_config(tmp_path, conditioning)
    trainer = Trainer(cfg, tmp_path, dataset)
    tx = trainer.optimizer(2)
    iterator = dataset.train_iterator(cfg.train.batch_size, cfg.seed)
    raw_batches = [next(iterator) for _ in range(2)]
    live = losses(trainer, tx, raw_batches)
    trainer.use_features(2, trainer.initial_params)
    assert trainer.features is not None and trainer.features.built
    expected_kind = "states" if "cross_attention" in conditioning else "pooled"
    assert trainer.features.kind == expected_kind
    cached = losses(trainer, tx, raw_batches)
    np.testing.assert_allclose(cached, live, rtol=2e-5)


def test_sampling_reads_the_cached_features(dataset, tmp_path):
    """Greedy decoding from cached features writes the tokens the live encoder leads to."""
    cfg = tiny_config(tmp_path, "prefix+cross_attention")
    trainer = Trainer(cfg, tmp_path, dataset)
    trainer.use_features(2, trainer.initial_params)
    batch = next(iter(dataset.eval_iterator("test", 8)))
    sampling = {"strategy": "greedy", "max_new_tokens": 6, "batch_size": 8}
    outputs = {}
    for name, rows in (("live", batch), ("cached", trainer.features.attach(batch, "test"))):
        outputs[name] = [
            g.token_ids
            for g in generate_batches(trainer.model, trainer.initial_params, [rows], sampling)
        ]
    assert "encoder_ids" not in trainer.features.attach(batch, "test")
    assert outputs["cached"] == outputs["live"]


def shuffled_vocab_tokenizer(folder: Path) -> Path:
    """MiniLM's tokenizer with the ids of two frequent word pieces swapped."""
    AutoTokenizer.from_pretrained(assets.minilm_folder()).save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "vocab.txt").unlink(missing_ok=True)
    return folder


def test_a_changed_weight_tokenizer_or_encoder_length_builds_a_new_cache(dataset, tmp_path):
    cfg = tiny_config(tmp_path, "prefix")
    trainer = Trainer(cfg, tmp_path, dataset)
    params = trainer.initial_params
    first = feature_cache.prepare(cfg, dataset, trainer.model, params)
    again = feature_cache.prepare(cfg, dataset, trainer.model, params)
    assert first.built and not again.built and again.folder == first.folder

    nudged = {**params, "encoder": jax.tree.map(np.array, params["encoder"])}
    leaf = jax.tree.leaves(nudged["encoder"])[0]
    leaf.flat[0] += 1e-3
    weights = feature_cache.prepare(cfg, dataset, trainer.model, nudged)

    tokenizer = shuffled_vocab_tokenizer(tmp_path / "tokenizer")
    for name, override in (
        ("tokenizer", {"data.encoder_tokenizer": str(tokenizer)}),
        ("max_encoder_tokens", {"data.max_encoder_tokens": "24"}),
    ):
        other_cfg = tiny_config(tmp_path, "prefix", **override)
        other = load_dataset(other_cfg.data)
        changed = feature_cache.prepare(other_cfg, other, trainer.model, params)
        assert changed.built and changed.folder != first.folder, name
    assert weights.built and weights.folder != first.folder
    assert not np.array_equal(weights.arrays["train"], first.arrays["train"])
    assert not feature_cache.wanted(cfg, trainer.model, ("encoder", "decoder", "conditioning"))


def test_a_truncated_or_half_written_cache_is_rebuilt_not_read(dataset, tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "cross_attention")
    trainer = Trainer(cfg, tmp_path, dataset)
    model, params = trainer.model, trainer.initial_params
    reference_cfg = tiny_config(tmp_path / "reference", "cross_attention")
    reference = feature_cache.prepare(reference_cfg, dataset, model, params)

    # A writer stopped after its first split (as by a kill) leaves no cache behind.
    real_write = feature_cache._write_split
    calls = []

    def dying_write(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing")
        real_write(*args)

    monkeypatch.setattr(feature_cache, "_write_split", dying_write)
    with pytest.raises(KeyboardInterrupt):
        feature_cache.prepare(cfg, dataset, model, params)
    monkeypatch.setattr(feature_cache, "_write_split", real_write)
    root = Path(cfg.cache.features_dir)
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
    # A temporary folder of a writer process that died, on this host.
    finished = [sys.executable, "-c", "import os; print(os.getpid())"]
    dead = subprocess.run(finished, text=True, capture_output=True, check=True).stdout.strip()
    stale = root / feature_cache._temporary_name(reference.folder.name, int(dead))
    stale.mkdir()

    rebuilt = feature_cache.prepare(cfg, dataset, model, params)
    assert rebuilt.built and not stale.exists()
    np.testing.assert_array_equal(rebuilt.arrays["train"], reference.arrays["train"])

    # Truncated after it was complete: built again, never read.
    path = rebuilt.folder / "validation.bin"
    size = path.stat().st_size
    del rebuilt
    with path.open("r+b") as file:
        file.truncate(size // 2)
    again = feature_cache.prepare(cfg, dataset, model, params)
    assert again.built
    np.testing.assert_array_equal(again.arrays["validation"], reference.arrays["validation"])


def test_training_reports_the_cache_bytes_and_evaluation_reads_it(tmp_path):
    cfg = tiny_config(tmp_path, "prefix", **{"train.steps": "2", "train.eval_every": "2"})
    loop.train(cfg, tmp_path / "run")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    cache = report["encoder_feature_cache"]
    files = Path(cache["folder"]).glob("*.bin")
    assert cache["bytes"] == sum(f.stat().st_size for f in files) > 0

    cached = evaluate.load_run(tmp_path / "run")
    live = evaluate.load_run(tmp_path / "run", [("cache.features_dir", "off")])
    assert cached.features is not None and not cached.features.built and live.features is None
    perplexities = [evaluate.split_perplexity(run, "test") for run in (cached, live)]
    assert perplexities[0] == pytest.approx(perplexities[1], rel=1e-5)
