"""Fixed-shape batches: length buckets, a deterministic resumable train iterator, eval passes.

A batch is a dict of numpy arrays (see ``make_batch``). Its lengths come from a few buckets,
so jit compiles at most ``len(target_buckets) * len(encoder_buckets)`` shapes. Multi-process:
every process builds the same global batch (same data, same seed) and keeps its contiguous
``1/process_count`` slice; lengths are chosen from the GLOBAL batch so all processes agree.
"""

from __future__ import annotations

import numpy as np

from research.data.arrays import TokenizedSplit


def bucket_length(longest: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``longest`` tokens."""
    index = int(np.searchsorted(buckets, longest))
    if index == len(buckets):
        raise ValueError(f"a row of {longest} tokens exceeds the largest bucket {buckets[-1]}")
    return buckets[index]


def make_batch(
    split: TokenizedSplit,
    rows: np.ndarray,
    local: slice,
    target_buckets: tuple[int, ...],
    encoder_buckets: tuple[int, ...],
) -> dict[str, np.ndarray]:
    """This process's ``local`` slice of the global batch ``rows`` (int [global], -1 = padding).

    Returns int32 arrays: ``decoder_ids``/``decoder_mask`` [batch, T], ``encoder_ids``/
    ``encoder_mask`` [batch, S] (when the split has encoder inputs), ``user``/``item``/
    ``example`` [batch], and float32 ``rating`` with int32 ``rating_mask`` [batch] (1 where the
    row is real and has a rating; ``rating`` is 0 elsewhere). T and S are the buckets of the
    longest row of the global batch. Padding rows have example -1, user/item 0, pad ids and
    all-zero masks.
    """
    real = rows[rows >= 0]
    batch_rows = rows[local]
    safe_rows = np.where(batch_rows >= 0, batch_rows, 0)
    is_real = batch_rows >= 0
    length = bucket_length(int(split.decoder.lengths_of(real).max(initial=1)), target_buckets)
    decoder_ids, decoder_mask = split.decoder.padded(batch_rows, length, split.decoder_pad)
    batch = {
        "decoder_ids": decoder_ids,
        "decoder_mask": decoder_mask,
        "user": np.where(is_real, split.user[safe_rows], 0).astype(np.int32),
        "item": np.where(is_real, split.item[safe_rows], 0).astype(np.int32),
        "example": batch_rows.astype(np.int32),
    }
    rating = np.full(len(batch_rows), np.nan) if split.rating is None else split.rating[safe_rows]
    rated = is_real & np.isfinite(rating)
    batch["rating"] = np.where(rated, rating, 0.0).astype(np.float32)
    batch["rating_mask"] = rated.astype(np.int32)
    if split.encoder is not None:
        length = bucket_length(int(split.encoder.lengths_of(real).max(initial=1)), encoder_buckets)
        batch["encoder_ids"], batch["encoder_mask"] = split.encoder.padded(
            batch_rows, length, split.encoder_pad
        )
    return batch


def _local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    size = global_batch_size // process_count
    return slice(process_index * size, (process_index + 1) * size)


def bucket_keys(split: TokenizedSplit, target_buckets, encoder_buckets) -> np.ndarray:
    """int64 [n]: one key per (target bucket, encoder bucket) cell of each example."""
    keys = np.searchsorted(target_buckets, split.decoder.lengths)
    if split.encoder is not None:
        keys = keys * len(encoder_buckets) + np.searchsorted(encoder_buckets, split.encoder.lengths)
    return keys


def epoch_plan(keys: np.ndarray, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """int64 [batches, batch_size]: the global batches of one epoch, a function of its inputs.

    Shuffle with (seed, epoch), drop the remainder (random examples, so no length is favoured),
    sort the rest stably by bucket key so batches share a bucket, then shuffle batch order.
    """
    rng = np.random.default_rng([seed, epoch])
    num_batches = len(keys) // batch_size
    kept = rng.permutation(len(keys))[: num_batches * batch_size]
    grouped = kept[np.argsort(keys[kept], kind="stable")]
    return grouped.reshape(num_batches, batch_size)[rng.permutation(num_batches)]


class TrainIterator:
    """Infinite shuffled batches of a split for one process; resumable with state()/restore().

    ``state()`` counts GLOBAL batches, so a run may resume with another process count.
    """

    def __init__(
        self,
        split: TokenizedSplit,
        global_batch_size: int,
        seed: int,
        target_buckets: tuple[int, ...],
        encoder_buckets: tuple[int, ...],
        process_index: int = 0,
        process_count: int = 1,
    ):
        self._local = _local_slice(global_batch_size, process_index, process_count)
        if len(split) < global_batch_size:
            raise ValueError(
                f"split '{split.name}' has {len(split)} examples, fewer than one global batch "
                f"of {global_batch_size}"
            )
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        self._split = split
        self._batch_size = global_batch_size
        self._seed = seed
        self._buckets = (target_buckets, encoder_buckets)
        self._keys = bucket_keys(split, target_buckets, encoder_buckets)
        self._epoch, self._position = 0, 0
        self._plan = epoch_plan(self._keys, global_batch_size, seed, 0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._split) // self._batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._position == len(self._plan):
            self._epoch, self._position = self._epoch + 1, 0
            self._plan = epoch_plan(self._keys, self._batch_size, self._seed, self._epoch)
        rows = self._plan[self._position]
        self._position += 1
        return make_batch(self._split, rows, self._local, *self._buckets)

    def state(self) -> dict[str, int]:
        """JSON-able position: the next batch is batch ``position`` of epoch ``epoch``."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "global_batch_size": self._batch_size,
            "num_examples": len(self._split),
        }

    def restore(self, state: dict[str, int]) -> None:
        """Continue exactly where the iterator that produced ``state`` stood."""
        for key in ("seed", "global_batch_size", "num_examples"):
            if int(state[key]) != self.state()[key]:
                raise ValueError(
                    f"iterator state has {key}={state[key]} but this iterator has "
                    f"{self.state()[key]}; it was saved for other data or settings"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"iterator state epoch={epoch} position={position} is out of range")
        self._epoch, self._position = epoch, position
        self._plan = epoch_plan(self._keys, self._batch_size, self._seed, epoch)


class EvalIterator:
    """One sequential pass over a split per ``iter()``; the last batch is padded to full size.

    ``examples`` (int [n], split indices) restricts the pass to those examples, in that order.
    """

    def __init__(
        self,
        split: TokenizedSplit,
        global_batch_size: int,
        target_buckets: tuple[int, ...],
        encoder_buckets: tuple[int, ...],
        process_index: int = 0,
        process_count: int = 1,
        examples: np.ndarray | None = None,
    ):
        self._local = _local_slice(global_batch_size, process_index, process_count)
        self._split = split
        self._rows = np.arange(len(split)) if examples is None else np.asarray(examples, np.int64)
        self._batch_size = global_batch_size
        self._buckets = (target_buckets, encoder_buckets)

    def __len__(self) -> int:
        return -(-len(self._rows) // self._batch_size)

    def __iter__(self):
        for start in range(0, len(self._rows), self._batch_size):
            rows = np.full(self._batch_size, -1, np.int64)
            chunk = self._rows[start : start + self._batch_size]
            rows[: len(chunk)] = chunk
            yield make_batch(self._split, rows, self._local, *self._buckets)
