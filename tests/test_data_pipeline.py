"""Pipeline: config checks, splits, index maps, targets, the tokenisation cache, the data report,
the full Amazon file end to end, and ``data_stats``."""

from __future__ import annotations

import json
import os
import pickle
import stat
import time

import numpy as np
import pytest

from research.data import pipeline
from research.data.config import DATA_CHOICES, data_config, validate_data_config
from research.data.pipeline import first_sentence, load_dataset
from research.data.splits import seeded_split
from research.data.stats import data_stats
from research.data.synthetic import synthetic_reviews
from research.data.tokenizers import gpt2_tokenizer
from tests.test_data_loaders import amazon_2014, require_amazon_file, write_lines


def small_synthetic(**overrides):
    cfg = data_config()
    cfg.synthetic.update(num_users=10, num_items=8, num_reviews=60)
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------------------------------------
# Config.


def test_default_config_has_every_contract_key_and_validates():
    cfg = data_config()
    for key in [
        "source",
        "path",
        "index_dir",
        "columns",
        "on_bad_row",
        "split_ratios",
        "split_seed",
        "keep_test_entities_in_train",
        "target",
        "max_target_tokens",
        "encoder_input",
        "max_encoder_tokens",
        "target_buckets",
        "encoder_buckets",
        "cache_dir",
        "synthetic",
    ]:
        assert key in cfg
    assert cfg.max_target_tokens == 20 and cfg.max_encoder_tokens == 128
    assert tuple(cfg.split_ratios) == (0.8, 0.1, 0.1)
    for key, valid in DATA_CHOICES.items():
        assert cfg[key] in valid
    validate_data_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"encoder_input": "tweets"},
            r"data\.encoder_input='tweets' is not valid; choose one of: none, review, "
            r"user_history, item_history, user_item_history, features",
        ),
        (
            {"on_bad_row": "ignore"},
            r"data\.on_bad_row='ignore' is not valid; choose one of: error, skip",
        ),
        ({"source": "amazon"}, r"data\.path is empty"),
        ({"split_ratios": (0.8, 0.1)}, r"data\.split_ratios=\(0\.8, 0\.1\) must be three"),
        ({"max_encoder_tokens": 1000}, r"data\.max_encoder_tokens=1000 must be between 3 and 512"),
        ({"target_buckets": (8, 0)}, r"data\.target_buckets=\(8, 0\) must be"),
        ({"source": "yelp", "path": "x", "target": "summary"}, r"data\.target='summary' needs"),
        ({"source": "amazon", "path": "x", "target": "template"}, r"data\.target='template' needs"),
        (
            {"source": "csv", "path": "x", "encoder_input": "features"},
            r"needs data\.columns\.features",
        ),
        ({"source": "amazon", "path": "x", "index_dir": "1"}, r"data\.index_dir is set"),
    ],
)
def test_validate_names_the_key(overrides, message):
    cfg = data_config()
    cfg.update(overrides)
    with pytest.raises(ValueError, match=message):
        validate_data_config(cfg)


# ---------------------------------------------------------------------------------------------
# Splits and index maps.


def test_seeded_split_is_deterministic_disjoint_and_keeps_entities_in_train():
    records = synthetic_reviews(30, 20, 200, seed=0, num_aspects=4)
    split = seeded_split(records, (0.8, 0.1, 0.1), seed=5, keep_test_entities_in_train=True)
    assert split == seeded_split(records, (0.8, 0.1, 0.1), 5, True)
    assert split != seeded_split(records, (0.8, 0.1, 0.1), 6, True)
    assert sorted(sum(split.values(), [])) == list(range(200))
    assert (len(split["validation"]), len(split["test"])) == (20, 20)
    train = [records[p] for p in split["train"]]
    for name in ("validation", "test"):
        assert {records[p].user for p in split[name]} <= {r.user for r in train}
        assert {records[p].item for p in split[name]} <= {r.item for r in train}


def test_validation_sample_is_seeded_and_spread_over_a_user_sorted_file(tmp_path):
    # 20 users x 10 reviews, sorted by user as many dumps are: the first 16 validation
    # examples in file order belong to a handful of users.
    rows = [
        {"user": f"u{u:02d}", "item": f"i{(u + k) % 15}", "rating": 3, "text": f"Review {k}."}
        for u in range(20)
        for k in range(10)
    ]
    cfg = data_config()
    cfg.update(source="jsonl", path=str(write_lines(tmp_path / "r.jsonl", rows)))
    cfg.update(encoder_input="none", split_ratios=(0.5, 0.5, 0.0))
    dataset = load_dataset(cfg)
    validation = dataset.splits["validation"]
    first = {validation.records[i].user for i in range(16)}
    sample = dataset.eval_subset("validation", 16, seed=0)
    assert np.array_equal(sample, dataset.eval_subset("validation", 16, seed=0))
    assert not np.array_equal(sample, dataset.eval_subset("validation", 16, seed=1))
    assert len(set(sample)) == 16 and np.all(np.diff(sample) > 0)
    sampled_users = {validation.records[i].user for i in sample}
    assert len(first) <= 4 and len(sampled_users) >= 10
    visited = [
        e for b in dataset.eval_iterator("validation", 8, examples=sample) for e in b["example"]
    ]
    assert visited == sample.tolist()
    assert dataset.eval_subset("validation", 0, seed=0) is None
    assert dataset.eval_subset("validation", len(validation), seed=0) is None


def test_index_maps_come_from_train_with_zero_for_unseen():
    cfg = small_synthetic(keep_test_entities_in_train=False, split_ratios=(0.3, 0.3, 0.4))
    dataset = load_dataset(cfg)
    train = dataset.splits["train"].records
    assert dataset.users == ["", *sorted({r.user for r in train})]
    assert dataset.num_users == len({r.user for r in train}) + 1
    assert dataset.num_items == len({r.item for r in train}) + 1
    unseen = 0
    for split in dataset.splits.values():
        for record, user, item in zip(split.records, split.user, split.item, strict=True):
            assert dataset.users[user] == (record.user if record.user in dataset.user_index else "")
            assert dataset.items[item] == (record.item if record.item in dataset.item_index else "")
            unseen += user == 0
    assert unseen > 0  # the settings leave some users out of train
    assert dataset.report["unseen_in_train"]["test"]["users"] == int(
        (dataset.splits["test"].user == 0).sum()
    )


# ---------------------------------------------------------------------------------------------
# Targets.


def test_first_sentence():
    assert first_sentence("  Great tuner! Holds pitch. ") == "Great tuner!"
    assert first_sentence("No end mark") == "No end mark"
    assert first_sentence("Version 2.5 works.\nReally.") == "Version 2.5 works."


@pytest.mark.parametrize("target", ["review", "first_sentence", "summary"])
def test_targets_are_cut_and_wrapped_in_bos_eos(tmp_path, target):
    texts = [
        "One two three four five six seven eight nine ten eleven. Second sentence here.",
        "Short one.",
    ]
    rows = [amazon_2014(f"A{k}", "B1", text=t, summary=f"title {k}") for k, t in enumerate(texts)]
    cfg = data_config()
    cfg.update(
        source="amazon",
        path=str(write_lines(tmp_path / "r.json", rows)),
        target=target,
        max_target_tokens=6,
        split_ratios=(1.0, 0.0, 0.0),
        encoder_input="none",
    )
    dataset = load_dataset(cfg)
    split = dataset.splits["train"]
    gpt2 = gpt2_tokenizer()
    for example, record in enumerate(split.records):
        text = {
            "review": record.text,
            "first_sentence": first_sentence(record.text),
            "summary": record.summary,
        }[target]
        assert split.target_texts[example] == text
        ids = gpt2(text)["input_ids"]
        assert split.decoder[example].tolist() == [50256, *ids[:6], 50256]
        assert split.target_token_counts[example] == len(ids)
    assert dataset.reference_texts("train")[0] == gpt2.decode(
        gpt2(split.target_texts[0])["input_ids"][:6]
    )
    batch = next(iter(dataset.eval_iterator("train", 2)))
    assert batch["decoder_ids"].shape == (2, 8)  # max_target_tokens + 2 caps the buckets


# ---------------------------------------------------------------------------------------------
# Cache and report.


def test_tokenisation_cache_is_reused_and_keyed_by_settings(tmp_path, monkeypatch):
    cfg = small_synthetic(cache_dir=str(tmp_path / "cache"))
    fresh = load_dataset(cfg)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenized again despite a cache hit")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_tokenize", must_not_run)
        cached = load_dataset(cfg)
    for name, split in fresh.splits.items():
        other = cached.splits[name]
        for field in ("decoder", "encoder"):
            np.testing.assert_array_equal(
                getattr(split, field).values, getattr(other, field).values
            )
            np.testing.assert_array_equal(
                getattr(split, field).offsets, getattr(other, field).offsets
            )
        assert split.records == other.records
    # Another setting, or other data under the same settings, is another key.
    load_dataset(small_synthetic(cache_dir=cfg.cache_dir, max_encoder_tokens=64))
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_tokenisation_cache_file_has_the_mode_of_any_new_file(umask, tmp_path):
    """Shared cache folders: the .npz is readable as a file ``open()`` makes (0o666 less the
    umask), not private like the temporary file it is written under."""
    previous = os.umask(umask)
    try:
        load_dataset(small_synthetic(cache_dir=str(tmp_path / "cache")))
    finally:
        os.umask(previous)
    (written,) = (tmp_path / "cache").iterdir()
    assert written.suffix == ".npz"
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask


def test_cache_key_follows_the_data_file(tmp_path):
    path = write_lines(tmp_path / "r.json", [amazon_2014()])
    cfg = data_config()
    cfg.update(source="amazon", path=str(path))
    tokenizers = (gpt2_tokenizer(),)
    before = pipeline.cache_key(cfg, [path], tokenizers)
    write_lines(path, [amazon_2014(text="Changed.")])
    assert pipeline.cache_key(cfg, [path], tokenizers) != before


def test_data_report_written_to_workdir(tmp_path):
    rows = [amazon_2014(f"A{k}", f"B{k % 3}") for k in range(20)] + [amazon_2014(text=""), b"{"]
    cfg = data_config()
    cfg.update(source="amazon", path=str(write_lines(tmp_path / "r.json", rows)), on_bad_row="skip")
    dataset = load_dataset(cfg, workdir=tmp_path / "work")
    report = json.loads((tmp_path / "work" / "data_report.json").read_text())
    assert report == dataset.report
    assert report["bad_rows"]["skipped"] == {"empty_text": 1, "invalid_json": 1}
    assert report["bad_rows"]["rows_read"] == 22
    assert sum(report["records_per_split"].values()) == 20


def test_pepler_end_to_end_uses_the_index_split(tmp_path):
    rows = [
        {
            "user": f"u{k % 4}",
            "item": f"i{k % 5}",
            "rating": 3,
            "template": ("sound", "good", f"the sound is good {k}", 1),
        }
        for k in range(20)
    ]
    (tmp_path / "reviews.pickle").write_bytes(pickle.dumps(rows))
    (tmp_path / "1").mkdir()
    order = np.random.default_rng(0).permutation(20).tolist()
    for name, positions in (
        ("train", order[:14]),
        ("validation", order[14:17]),
        ("test", order[17:]),
    ):
        (tmp_path / "1" / f"{name}.index").write_text(" ".join(map(str, positions)))
    cfg = data_config()
    cfg.update(
        source="pepler",
        path=str(tmp_path / "reviews.pickle"),
        index_dir=str(tmp_path / "1"),
        target="template",
        encoder_input="features",
    )
    dataset = load_dataset(cfg)
    assert [r.sentence for r in dataset.splits["test"].records] == [
        f"the sound is good {k}" for k in order[17:]
    ]
    assert dataset.splits["test"].target_texts == [f"the sound is good {k}" for k in order[17:]]


# ---------------------------------------------------------------------------------------------
# The full shared Amazon file.


def test_amazon_file_end_to_end_is_fast_and_consistent():
    cfg = data_config()
    cfg.update(source="amazon", path=str(require_amazon_file()), on_bad_row="skip")
    start = time.perf_counter()
    dataset = load_dataset(cfg)
    seconds = time.perf_counter() - start
    # Both tokenizers over every review; a few seconds on one core.
    assert seconds < 60, f"loading and tokenizing took {seconds:.1f}s"
    assert dataset.num_users == 1_429 + 1 and dataset.num_items == 900 + 1
    assert sum(len(s) for s in dataset.splits.values()) == 10_254
    # 5-core data: with keep_test_entities_in_train every test user and item is known.
    assert dataset.report["unseen_in_train"]["test"] == {"users": 0, "items": 0}
    batch = next(dataset.train_iterator(64, seed=0))
    assert batch["decoder_ids"].shape == (64, 22) and batch["encoder_ids"].shape == (64, 128)


def test_data_stats_reports_counts_lengths_and_bad_rows(tmp_path):
    rows = [amazon_2014(f"A{k}", f"B{k % 3}", text="word " * k + "end.") for k in range(30)]
    rows.append(amazon_2014(text="  "))
    cfg = data_config()
    cfg.update(source="amazon", path=str(write_lines(tmp_path / "r.json", rows)), on_bad_row="skip")
    text = data_stats(cfg)
    dataset = load_dataset(cfg)
    counts = np.concatenate([s.target_token_counts for s in dataset.splits.values()])
    sizes = ", ".join(f"{name} {len(split)}" for name, split in dataset.splits.items())
    assert f"records: {sizes}" in text
    assert "users in train: 30, items in train: 3" in text
    assert f"p50 {round(np.percentile(counts, 50))}" in text and f"max {counts.max()}" in text
    assert "rows read: 31, kept: 30, skipped: empty_text 1" in text
    assert f"{cfg.path}:31: empty text" in text
