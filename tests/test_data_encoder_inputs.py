"""Encoder inputs: no leakage (property test), the same ids as the tokenizer on the joined text,
and a synthetic corpus whose histories determine the target."""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from research.data.config import data_config
from research.data.encoder_inputs import (
    HISTORY_SEPARATOR,
    ITEM_LABEL,
    USER_LABEL,
    clean_text,
    encoder_rows,
    training_histories,
)
from research.data.pipeline import load_dataset
from research.data.records import Review
from research.data.synthetic import ASPECTS, SUMMARIES, VOICES, review_text, synthetic_reviews
from research.data.tokenizers import encoder_tokenizer
from tests.test_data_loaders import require_amazon_file

HISTORY_MODES = ("user_history", "item_history", "user_item_history")
WORDS = ("good", "bad", "strings", "sound", "the", "is", "cheap", "tuner", "!", ".")


@functools.cache
def bert():
    return encoder_tokenizer()


def marker(position: int) -> str:
    """A word that appears in the text of record ``position`` only."""
    return f"m{position}q"


@st.composite
def corpora(draw):
    """Random records (few users/items, so histories overlap; duplicate pairs allowed) and a
    random split assignment."""
    size = draw(st.integers(1, 25))
    records, split_of = [], []
    for position in range(size):
        words = draw(st.lists(st.sampled_from(WORDS), max_size=8))
        records.append(
            Review(
                user=f"u{draw(st.integers(0, 3))}",
                item=f"i{draw(st.integers(0, 3))}",
                rating=1.0,
                text=" ".join([*words, marker(position)]),
                timestamp=draw(st.none() | st.integers(0, 5)),
            )
        )
        split_of.append(draw(st.sampled_from(("train", "train", "validation", "test"))))
    return records, split_of


def reference_history(records, train, position, by: str) -> list[int]:
    """Spec, written out: training reviews of the same user (item), not of the target's pair,
    newest first, undated last, ties in file order."""
    target = records[position]
    chosen = [
        p
        for p in train
        if getattr(records[p], by) == getattr(target, by)
        and (records[p].user, records[p].item) != (target.user, target.item)
    ]
    return sorted(
        chosen, key=lambda p: (records[p].timestamp is None, -(records[p].timestamp or 0), p)
    )


def reference_ids(records, train, position, mode, max_tokens) -> list[int]:
    """The tokenizer itself on the joined history text(s).

    For the pair, the tokenizer gives an odd leftover token to the longer side; ours to the
    user side. They agree whenever the pair's budget (max_tokens - 3) is even.
    """

    def joined(by):
        return HISTORY_SEPARATOR.join(
            records[p].text for p in reference_history(records, train, position, by)
        )

    if mode == "user_item_history":
        return bert()(
            f"{USER_LABEL} {joined('user')}",
            f"{ITEM_LABEL} {joined('item')}",
            truncation="longest_first",
            max_length=max_tokens,
        )["input_ids"]
    by = "user" if mode == "user_history" else "item"
    return bert()(joined(by), truncation=True, max_length=max_tokens)["input_ids"]


@settings(max_examples=60, deadline=None)
@given(corpus=corpora(), max_tokens=st.sampled_from((9, 24, 127, 128)))
def test_history_inputs_never_contain_the_target_review(corpus, max_tokens):
    records, split_of = corpus
    train = [p for p, split in enumerate(split_of) if split == "train"]
    everything = list(range(len(records)))
    histories = training_histories(records, train)
    for mode in HISTORY_MODES:
        rows = encoder_rows(
            mode, records, everything, [r.text for r in records], histories, bert(), max_tokens
        )
        for position, ids in enumerate(rows):
            words = bert().decode(ids).split()
            shown = {p for p in range(len(records)) if marker(p) in words}
            assert marker(position) not in words
            # Everything shown is a training review of another (user, item) pair.
            target = records[position]
            assert all(split_of[p] == "train" for p in shown)
            assert all(
                (records[p].user, records[p].item) != (target.user, target.item) for p in shown
            )
            assert len(ids) <= max_tokens
            if mode != "user_item_history" or (max_tokens - 3) % 2 == 0:
                assert ids == reference_ids(records, train, position, mode, max_tokens)


def test_clean_encoder_text_strips_punctuation_and_collapses_whitespace():
    assert clean_text("  Great, warm tone!!  Loud\n&  clear... (5/5) ") == (
        "Great warm tone Loud clear 55"
    )
    assert clean_text("naïve café_ok") == "naïve café_ok"  # \w is Unicode, and keeps "_"
    records = [
        Review("u1", "i1", 5.0, "Loud, clear!  Warm."),
        Review("u1", "i2", 4.0, "Fine -- really?"),
        Review("u2", "i1", 3.0, "OK; not   more."),
    ]
    cleaned = [Review(r.user, r.item, r.rating, clean_text(r.text)) for r in records]
    positions, targets = [0, 1, 2], [""] * 3
    for mode in ("user_history", "item_history", "user_item_history"):
        ours = encoder_rows(
            mode,
            records,
            positions,
            targets,
            training_histories(records, positions),
            bert(),
            32,
            clean=True,
        )
        reference = encoder_rows(
            mode, cleaned, positions, targets, training_histories(cleaned, positions), bert(), 32
        )
        assert ours == reference, mode
        raw = encoder_rows(
            mode, records, positions, targets, training_histories(records, positions), bert(), 32
        )
        assert ours != raw, mode


def test_clean_encoder_text_is_a_data_setting_with_its_own_cache(tmp_path):
    cfg = data_config()
    cfg.synthetic.update(num_users=6, num_items=5, num_reviews=30)
    cfg.cache_dir = str(tmp_path)
    raw = load_dataset(cfg)
    cfg.clean_encoder_text = True
    cleaned = load_dataset(cfg)
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 2
    text = bert().decode(cleaned.splits["train"].encoder[0].tolist())
    assert "," not in text.split("[SEP]", 1)[0] and "." not in text
    assert raw.splits["train"].encoder[0].tolist() != cleaned.splits["train"].encoder[0].tolist()


def test_review_and_features_inputs_are_the_tokenizer_on_the_text():
    records = synthetic_reviews(5, 5, 10, seed=1, num_aspects=4)
    targets = [f"target {k}." for k in range(len(records))]
    histories = training_histories(records, range(len(records)))
    everything = list(range(len(records)))
    review = encoder_rows("review", records, everything, targets, histories, bert(), 6)
    assert review == bert()(targets, truncation=True, max_length=6)["input_ids"]
    features = encoder_rows("features", records, everything, targets, histories, bert(), 32)
    assert [bert().decode(ids) for ids in features] == [
        f"[CLS] {r.features[0]}, {r.features[1]} [SEP]" for r in records
    ]
    assert encoder_rows("none", records, everything, targets, histories, bert(), 6) is None


def test_history_ids_match_the_tokenizer_on_real_amazon_reviews():
    """Real text (accents, punctuation, long words) through the concatenation shortcut."""
    with gzip.open(require_amazon_file()) as file:
        rows = [json.loads(line) for _, line in zip(range(400), file, strict=False)]
    records = [
        Review(
            r["reviewerID"],
            r["asin"],
            r["overall"],
            r["reviewText"] or "-",
            timestamp=r["unixReviewTime"],
        )
        for r in rows
    ]
    rng = np.random.default_rng(0)
    train = sorted(rng.choice(len(records), 300, replace=False).tolist())
    # Targets outside train, as validation/test ones are: new reviews of item 0 by known users.
    users = sorted({r.user for r in records})[:20]
    records += [Review(user, records[0].item, 5.0, "extra") for user in users]
    targets = list(range(400, len(records))) + list(range(0, 400, 7))
    histories = training_histories(records, train)
    for mode in HISTORY_MODES:
        encoded = encoder_rows(mode, records, targets, [""] * len(targets), histories, bert(), 127)
        for position, ids in zip(targets, encoded, strict=True):
            assert ids == reference_ids(records, train, position, mode, 127)


# ---------------------------------------------------------------------------------------------
# The synthetic corpus.

CLAUSE = re.compile(r"the (\w+) is (\w+)")
LEVEL = {word: level - 1 for voice in VOICES for level, word in enumerate(voice)}


def read_target_from_histories(encoder_text: str) -> str | None:
    """Rebuild the review from the decoded user+item histories by the documented rules."""
    user_part, _, item_part = encoder_text.partition(f"{ITEM_LABEL[:-1]} :")
    clauses = [c for c in CLAUSE.findall(user_part) if c[1] in LEVEL]
    if len(clauses) < 2:
        return None
    (first, word), (second, _) = clauses[:2]
    voice = next(v for v, words in enumerate(VOICES) if word in words)
    quality = {aspect: LEVEL[w] for aspect, w in CLAUSE.findall(item_part) if w in LEVEL}
    if first not in quality or second not in quality:
        return None
    return review_text((first, second), voice, (quality[first], quality[second]))


def test_synthetic_reviews_follow_the_documented_rules():
    records = synthetic_reviews(12, 9, 80, seed=3, num_aspects=5)
    assert records == synthetic_reviews(12, 9, 80, seed=3, num_aspects=5)
    assert records != synthetic_reviews(12, 9, 80, seed=4, num_aspects=5)
    assert len({(r.user, r.item) for r in records}) == 80
    aspects_of, voice_of, quality_of = {}, {}, {}
    for r in records:
        (a1, w1, conn, a2, w2) = re.fullmatch(
            r"the (\w+) is (\w+) (and|but) the (\w+) is (\w+)\.", r.text
        ).groups()
        q1, q2 = LEVEL[w1], LEVEL[w2]
        assert {a1, a2} <= set(ASPECTS[:5]) and a1 != a2
        assert r.features == (a1, a2) and r.sentence == r.text
        assert r.rating == 3 + q1 + q2 and r.summary == SUMMARIES[r.rating]
        assert conn == ("but" if {q1, q2} == {-1, 1} else "and")
        # A user always writes about the same aspects in the same voice; an item's quality on
        # an aspect is the same whoever writes about it.
        assert aspects_of.setdefault(r.user, (a1, a2)) == (a1, a2)
        voice = next(v for v, words in enumerate(VOICES) if w1 in words)
        assert w2 in VOICES[voice] and voice_of.setdefault(r.user, voice) == voice
        assert quality_of.setdefault((r.item, a1), q1) == q1
        assert quality_of.setdefault((r.item, a2), q2) == q2
    assert len({r.timestamp for r in records}) == 80


def test_synthetic_histories_determine_the_target_and_nothing_else_does():
    dataset = load_dataset(data_config())
    rebuilt = []
    for split in ("validation", "test"):
        tokenized = dataset.splits[split]
        for example, target in enumerate(tokenized.target_texts):
            read = read_target_from_histories(bert().decode(tokenized.encoder[example]))
            rebuilt.append(read == target)
    # Misses are items whose few shown reviews skip an aspect the user cares about.
    assert np.mean(rebuilt) > 0.9
    # Without conditioning the best guess is the most frequent text, which is rarely right.
    counts = Counter(r.text for r in dataset.splits["train"].records)
    assert counts.most_common(1)[0][1] / len(dataset.splits["train"]) < 0.05
    # GPT-2 turns each review into a short target.
    assert set(dataset.splits["train"].target_token_counts.tolist()) <= set(range(8, 21))
