"""The domain-pretraining recipe reads every training review of the ablation and nothing else.

``experiments/configs/lm_pretrain_amazon_mi.py`` pretrains the decoder that
``ablation_amazon_mi.py`` starts from. Its corpus (the train split the training loop draws from)
must hold no review of the ablation's validation or test split, which are computed here on
their own from the raw file and the ablation's split settings.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from research.config import load_config, load_config_file
from research.data.loaders import load_records
from research.data.pipeline import load_dataset
from research.data.splits import seeded_split

CONFIGS = Path(__file__).parents[1] / "experiments" / "configs"
PRETRAIN, ABLATION = CONFIGS / "lm_pretrain_amazon_mi.py", CONFIGS / "ablation_amazon_mi.py"


def _key(record) -> tuple[str, str, str]:
    return record.user, record.item, record.text


def test_pretraining_corpus_is_the_ablation_train_split():
    # The ablation's own config file, unresolved: its run:... decoder need not exist yet.
    pretrain, ablation = load_config(PRETRAIN), load_config_file(ABLATION)
    if not Path(ablation.data.path).is_file():
        pytest.skip(f"shared data file {ablation.data.path} is absent")
    assert pretrain.data.path == ablation.data.path
    assert pretrain.model.conditioning == "none"
    assert ablation.init.decoder.startswith("run:")

    records = load_records(ablation.data).records
    d = ablation.data
    splits = seeded_split(
        records, tuple(d.split_ratios), d.split_seed, d.keep_test_entities_in_train
    )
    held_out = {_key(records[p]) for split in ("validation", "test") for p in splits[split]}
    train = {_key(records[p]) for p in splits["train"]}
    with gzip.open(ablation.data.path) as file:
        raw_reviews = sum(1 for line in file if json.loads(line)["reviewText"].strip())
    assert len(train) + len(held_out) == raw_reviews  # (user, item, text) identifies a review

    corpus = load_dataset(pretrain.data).splits["train"]
    corpus_keys = [_key(r) for r in corpus.records]
    assert not set(corpus_keys) & held_out
    assert sorted(corpus_keys) == sorted(train)
    # The decoder reads the review text itself, cut to the recipe's token budget.
    assert corpus.target_texts == [r.text for r in corpus.records]
