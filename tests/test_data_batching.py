"""Batches: fixed bucket shapes, determinism, exact resume, disjoint per-process shards, eval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from research.data.arrays import DECODER_PAD, ENCODER_PAD, Ragged, TokenizedSplit
from research.data.batching import EvalIterator, TrainIterator, epoch_plan

TARGET_BUCKETS = (8, 12, 22)
ENCODER_BUCKETS = (16, 32, 64)


def random_split(size: int, seed: int = 0, encoder: bool = True) -> TokenizedSplit:
    """Token rows of random lengths, shaped like the pipeline's (BOS ... EOS, [CLS] ... [SEP])."""
    rng = np.random.default_rng(seed)
    decoder = [
        [DECODER_PAD, *rng.integers(0, 50000, n).tolist(), DECODER_PAD]
        for n in rng.integers(1, 21, size)
    ]
    encoder_rows = [
        [101, *rng.integers(1000, 30000, n - 2).tolist(), 102] for n in rng.integers(2, 65, size)
    ]
    return TokenizedSplit(
        name="train",
        records=[None] * size,
        user=rng.integers(1, 50, size).astype(np.int32),
        item=rng.integers(1, 30, size).astype(np.int32),
        target_texts=[""] * size,
        target_token_counts=np.zeros(size, dtype=np.int64),
        decoder=Ragged.from_rows(decoder),
        encoder=Ragged.from_rows(encoder_rows) if encoder else None,
    )


def train_iterator(split, batch_size=16, seed=0, process_index=0, process_count=1):
    return TrainIterator(
        split, batch_size, seed, TARGET_BUCKETS, ENCODER_BUCKETS, process_index, process_count
    )


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def check_batch(batch, split: TokenizedSplit, rows_expected: int):
    """Every field against the split's ragged rows, padded by hand."""
    examples = batch["example"]
    assert examples.shape == (rows_expected,)
    for name, pad, buckets in (
        ("decoder", DECODER_PAD, TARGET_BUCKETS),
        ("encoder", ENCODER_PAD, ENCODER_BUCKETS),
    ):
        if getattr(split, name) is None:
            continue
        ids, mask = batch[f"{name}_ids"], batch[f"{name}_mask"]
        assert ids.dtype == mask.dtype == np.int32
        assert ids.shape[1] in buckets
        for row, example in enumerate(examples):
            tokens = getattr(split, name)[example] if example >= 0 else np.array([], np.int32)
            expected = np.full(ids.shape[1], pad)
            expected[: len(tokens)] = tokens
            np.testing.assert_array_equal(ids[row], expected)
            np.testing.assert_array_equal(mask[row], np.arange(ids.shape[1]) < len(tokens))
    real = examples >= 0
    np.testing.assert_array_equal(batch["user"], np.where(real, split.user[examples], 0))
    np.testing.assert_array_equal(batch["item"], np.where(real, split.item[examples], 0))


def test_batches_have_the_smallest_bucket_that_fits_and_exact_contents():
    split = random_split(200)
    iterator = train_iterator(split)
    shapes = set()
    for batch in take(iterator, 2 * iterator.batches_per_epoch):
        check_batch(batch, split, 16)
        for name, buckets in (("decoder", TARGET_BUCKETS), ("encoder", ENCODER_BUCKETS)):
            longest = batch[f"{name}_mask"].sum(axis=1).max()
            length = batch[f"{name}_ids"].shape[1]
            assert length == min(b for b in buckets if b >= longest)
        shapes.add((batch["decoder_ids"].shape, batch["encoder_ids"].shape))
        # The loss reads positions >= 1 under the mask: BOS opens every row, EOS closes it.
        ids, mask = batch["decoder_ids"], batch["decoder_mask"]
        assert (ids[:, 0] == DECODER_PAD).all() and (mask[:, 0] == 1).all()
    assert len(shapes) <= len(TARGET_BUCKETS) * len(ENCODER_BUCKETS)


def test_grouping_by_bucket_reduces_padding():
    split = random_split(512)
    iterator = train_iterator(split, batch_size=32)
    batches = take(iterator, iterator.batches_per_epoch)
    padded = sum(b["decoder_ids"].size for b in batches)
    # The same examples in plain shuffled order, each batch padded to its bucket.
    rng = np.random.default_rng(0)
    order = rng.permutation(512)[: 32 * len(batches)].reshape(len(batches), 32)
    lengths = split.decoder.lengths
    plain = sum(32 * min(b for b in TARGET_BUCKETS if b >= lengths[rows].max()) for rows in order)
    assert padded < plain


def test_each_epoch_visits_distinct_examples_and_epochs_differ():
    split = random_split(100)
    iterator = train_iterator(split, batch_size=16)
    assert iterator.batches_per_epoch == 6
    epochs = []
    for _ in range(3):
        examples = np.concatenate([b["example"] for b in take(iterator, 6)])
        assert len(set(examples.tolist())) == 96
        epochs.append(examples)
    assert not np.array_equal(epochs[0], epochs[1])


def test_same_seed_same_batches_other_seed_other_batches():
    split = random_split(100)
    assert_same_batches(
        take(train_iterator(split, seed=7), 15), take(train_iterator(split, seed=7), 15)
    )
    first = take(train_iterator(split, seed=7), 6)
    other = take(train_iterator(split, seed=8), 6)
    assert any(
        not np.array_equal(a["example"], b["example"]) for a, b in zip(first, other, strict=True)
    )


@pytest.mark.parametrize("stop", [0, 1, 4, 6, 7, 13])
def test_restored_iterator_continues_exactly(stop):
    # 6 batches per epoch: stops mid-epoch, at an epoch boundary and in a later epoch.
    split = random_split(100)
    uninterrupted = take(train_iterator(split, seed=3), 20)
    interrupted = train_iterator(split, seed=3)
    take(interrupted, stop)
    saved = json.loads(json.dumps(interrupted.state()))
    assert all(isinstance(v, int) for v in saved.values())
    resumed = train_iterator(split, seed=3)
    resumed.restore(saved)
    assert_same_batches(take(resumed, 20 - stop), uninterrupted[stop:])


def test_restore_refuses_state_of_other_settings():
    split = random_split(100)
    state = train_iterator(split, batch_size=16).state()
    with pytest.raises(ValueError, match=r"global_batch_size=16 but this iterator has 20"):
        train_iterator(split, batch_size=20).restore(state)
    with pytest.raises(ValueError, match=r"seed=0 but this iterator has 1"):
        train_iterator(split, seed=1).restore(state)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_cover_the_global_batch(process_count):
    split = random_split(100)
    global_batches = take(train_iterator(split, batch_size=16), 8)
    shards = [
        take(train_iterator(split, 16, 0, index, process_count), 8)
        for index in range(process_count)
    ]
    for step, whole in enumerate(global_batches):
        parts = [shard[step] for shard in shards]
        examples = [set(p["example"].tolist()) for p in parts]
        assert all(len(e) == 16 // process_count for e in examples)
        assert set().union(*examples) == set(whole["example"].tolist())
        assert sum(len(e) for e in examples) == 16
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_resume_with_another_process_count():
    split = random_split(100)
    single = train_iterator(split, batch_size=16)
    take(single, 4)
    halves = [train_iterator(split, 16, 0, index, 2) for index in range(2)]
    for half in halves:
        half.restore(single.state())
    for _ in range(5):
        whole, parts = next(single), [next(h) for h in halves]
        np.testing.assert_array_equal(
            np.concatenate([p["example"] for p in parts]), whole["example"]
        )


def test_batch_size_must_divide_by_process_count_and_fit_the_split():
    split = random_split(40)
    with pytest.raises(
        ValueError, match=r"global batch size 10 must be a positive multiple of the process count 4"
    ):
        train_iterator(split, 10, 0, 0, 4)
    with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, 2\)"):
        train_iterator(split, 8, 0, 2, 2)
    with pytest.raises(
        ValueError, match=r"split 'train' has 40 examples, fewer than one global batch of 64"
    ):
        train_iterator(split, 64)


def test_epoch_plan_keeps_a_random_subset_and_groups_buckets():
    keys = np.repeat([0, 1, 2], [10, 10, 11])
    plan = epoch_plan(keys, batch_size=5, seed=0, epoch=0)
    assert plan.shape == (6, 5)
    assert len(set(plan.ravel().tolist())) == 30
    # Sorted by key before cutting: at most one batch straddles each key boundary.
    assert sum(len(set(keys[row].tolist())) > 1 for row in plan) <= 2
    dropped = [set(range(31)) - set(epoch_plan(keys, 5, 0, e).ravel().tolist()) for e in range(40)]
    # The dropped example is drawn at random, not always the longest.
    assert len({d.pop() for d in dropped}) > 5


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_iterator_is_one_sequential_pass_with_padding_rows(process_count):
    split = random_split(37, encoder=False)
    global_passes = list(EvalIterator(split, 16, TARGET_BUCKETS, ENCODER_BUCKETS))
    assert len(EvalIterator(split, 16, TARGET_BUCKETS, ENCODER_BUCKETS)) == 3
    examples = np.concatenate([b["example"] for b in global_passes])
    np.testing.assert_array_equal(examples, np.r_[np.arange(37), np.full(11, -1)])
    last = global_passes[-1]
    assert "encoder_ids" not in last
    padding = last["example"] < 0
    assert (last["decoder_mask"][padding] == 0).all()
    assert (last["decoder_ids"][padding] == DECODER_PAD).all()
    assert (last["user"][padding] == 0).all() and (last["item"][padding] == 0).all()
    for batch in global_passes:
        check_batch(batch, split, 16)
    # Per-process slices of each global batch, shapes chosen from the global batch.
    shards = [
        list(EvalIterator(split, 16, TARGET_BUCKETS, ENCODER_BUCKETS, index, process_count))
        for index in range(process_count)
    ]
    for step, whole in enumerate(global_passes):
        for key in whole:
            np.testing.assert_array_equal(
                np.concatenate([shard[step][key] for shard in shards]), whole[key]
            )
    # Iterating again is a fresh pass.
    assert_same_batches(
        list(EvalIterator(split, 16, TARGET_BUCKETS, ENCODER_BUCKETS)), global_passes
    )


def test_ragged_padding_matches_a_loop():
    rows = [[1, 2, 3], [], [4], [5, 6, 7, 8, 9]]
    ragged = Ragged.from_rows(rows)
    ids, mask = ragged.padded(np.array([3, -1, 0, 1, 2]), 6, pad_id=-7)
    expected = np.full((5, 6), -7)
    for out, row in enumerate([3, -1, 0, 1, 2]):
        tokens = rows[row] if row >= 0 else []
        expected[out, : len(tokens)] = tokens
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(mask, expected != -7)
    with pytest.raises(ValueError, match="a row of 5 tokens does not fit length 4"):
        ragged.padded(np.array([3]), 4, 0)
