"""The benchmark's random inputs, numpy only: both sides' fresh-process children import this
module without loading the other side's framework."""

from __future__ import annotations

import numpy as np


def lm_batch(rng: np.random.Generator, rows: int, seq: int, vocab_size: int) -> dict:
    """Random decoder tokens ``[rows, seq]``, no padding."""
    ids = rng.integers(0, vocab_size, (rows, seq), dtype=np.int32)
    return {"decoder_ids": ids, "decoder_mask": np.ones_like(ids)}


def conditioned_batch(rng: np.random.Generator, setup) -> dict:
    """Random encoder tokens ``[batch, encoder_seq]`` plus :func:`lm_batch` (a ``Setup``'s
    shapes)."""
    enc = rng.integers(
        0, setup.encoder.vocab_size, (setup.batch, setup.encoder_seq), dtype=np.int32
    )
    decoder = lm_batch(rng, setup.batch, setup.seq, setup.decoder.vocab_size)
    return decoder | {"encoder_ids": enc, "encoder_mask": np.ones_like(enc)}
