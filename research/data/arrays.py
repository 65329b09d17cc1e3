"""Tokenized data held as ragged int32 arrays, and one split's records with its arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from research.data.records import Review


@dataclass(frozen=True)
class Ragged:
    """Variable-length int32 rows packed flat: row ``r`` is ``values[offsets[r]:offsets[r+1]]``.

    ``values`` int32 [total], ``offsets`` int64 [rows + 1] (``offsets[0] == 0``).
    """

    values: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(chain.from_iterable(rows), dtype=np.int32, count=offsets[-1])
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> np.ndarray:
        return self.values[self.offsets[row] : self.offsets[row + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """int64 [rows]."""
        return np.diff(self.offsets)

    def lengths_of(self, rows: np.ndarray) -> np.ndarray:
        """int64 [len(rows)]: lengths of the given rows (without touching the others)."""
        return self.offsets[rows + 1] - self.offsets[rows]

    def padded(self, rows: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``rows`` (int [batch], -1 = a padding row) right-padded to ``length``.

        Returns ids and mask, both int32 [batch, length]; padding rows are all ``pad_id``/0.
        Rows longer than ``length`` are an error: callers pick ``length`` from the longest row.
        """
        real = rows >= 0
        safe_rows = np.where(real, rows, 0)
        lengths = np.where(real, self.lengths_of(safe_rows), 0)
        if lengths.max(initial=0) > length:
            raise ValueError(f"a row of {lengths.max()} tokens does not fit length {length}")
        positions = np.arange(length)
        mask = positions[None, :] < lengths[:, None]
        # Clip keeps masked gathers in bounds; np.where then drops what they read.
        flat = np.minimum(
            self.offsets[safe_rows][:, None] + positions[None, :], len(self.values) - 1
        )
        ids = np.where(mask, self.values[flat] if len(self.values) else 0, pad_id)
        return ids.astype(np.int32), mask.astype(np.int32)


# Padding ids of GPT-2's <|endoftext|> and BERT's [PAD] (research/data/tokenizers.py); a split
# built with other tokenizers carries theirs.
DECODER_PAD = 50256
ENCODER_PAD = 0


@dataclass(frozen=True)
class TokenizedSplit:
    """One split: its records and, per record (the ``example`` index), model inputs.

    ``user``/``item`` int32 [n] (0 = not seen in training); ``decoder`` rows are
    BOS + target tokens + EOS; ``encoder`` rows are [CLS] ... [SEP] (None without an encoder
    input); ``target_texts`` the untruncated targets; ``target_token_counts`` int64 [n] their
    lengths in decoder tokens before the cut to ``max_target_tokens``; ``rating`` float32 [n],
    NaN where a record has none (None: no record has one).
    """

    name: str
    records: list[Review]
    user: np.ndarray
    item: np.ndarray
    target_texts: list[str]
    target_token_counts: np.ndarray
    decoder: Ragged
    encoder: Ragged | None
    decoder_pad: int = DECODER_PAD
    encoder_pad: int = ENCODER_PAD
    rating: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)
