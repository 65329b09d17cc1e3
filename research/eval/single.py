"""``research generate`` for one input: a conditioning text, or a user and an item.

``--text`` is fed to the encoder as it is, so the command first says what input the run was
trained on (``input_format``). ``--user U --item I`` builds the encoder input the way training
did, from the run's training histories. A user or item the run never saw is an error when the
method reads ids (its embedding row 0 was never trained); methods that only read text take any
id, with a warning naming what the encoder gets instead. ``rate_one`` gives the rating head's
prediction for the same input where the head can rate it.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from research.config import ConfigError
from research.data import tokenizers
from research.data.encoder_inputs import (
    FEATURE_SEPARATOR,
    HISTORY_SEPARATOR,
    clean_text,
    encoder_rows,
    training_histories,
)
from research.data.records import Review
from research.models.conditioning import needs_encoder
from research.models.rating import head_reads_text
from research.sampling import SamplingConfig, generate

INPUT_FORMATS = {
    "none": "nothing (the decoder is not conditioned on text)",
    "review": "the review itself (paraphrase setting)",
    "features": f"the review's aspect words joined with {FEATURE_SEPARATOR!r}",
    "user_history": f"[CLS] <the user's training reviews, newest first, joined with "
    f"{HISTORY_SEPARATOR.strip()!r}> [SEP]",
    "item_history": f"[CLS] <the item's training reviews, newest first, joined with "
    f"{HISTORY_SEPARATOR.strip()!r}> [SEP]",
    "user_item_history": "[CLS] user: <the user's training reviews> [SEP] item: <the item's "
    "training reviews> [SEP]",
}


def input_format(run) -> str:
    """One line: what the encoder of ``run`` read in training (``data.encoder_input``)."""
    mode = run.cfg.data.encoder_input
    return (
        f"trained input (data.encoder_input={mode!r}, at most "
        f"{run.cfg.data.max_encoder_tokens} tokens): {INPUT_FORMATS[mode]}"
    )


def _check_ids(run, user: str, item: str, with_text: bool) -> None:
    reads = set(run.model.spec.id_keys)
    for key, value, index in (
        ("user", user, run.dataset.user_index),
        ("item", item, run.dataset.item_index),
    ):
        if not value or value in index:
            continue
        if key in reads:
            known = ", ".join(sorted(index)[:5])
            raise ConfigError(
                f"--{key} {value!r} is not a {key} of the run's training data, and "
                f"model.conditioning={'+'.join(run.model.spec.conditioning)!r} reads {key} ids "
                f"(unseen ones have no trained embedding); known {key}s include {known}"
            )
        effect = (
            "it is not used"
            if with_text or not run.model.spec.uses_encoder
            else f"the encoder reads an empty {key} history"
        )
        print(
            f"warning: --{key} {value!r} has no training reviews; the method reads no {key} "
            f"ids, so it takes unseen {key}s: {effect}",
            file=sys.stderr,
        )


def encoder_input_for(run, user: str, item: str) -> list[int]:
    """Encoder token ids for (user, item), built from the run's training reviews as in training."""
    mode = run.cfg.data.encoder_input
    if mode in ("review", "features"):
        raise ConfigError(
            f"data.encoder_input={mode!r} reads the review being written; pass it with --text"
        )
    train = list(run.dataset.splits["train"].records)
    records = [*train, Review(user=user, item=item, rating=None, text="")]
    histories = training_histories(records, range(len(train)))
    tokenizer = tokenizers.encoder_tokenizer(run.cfg.data.encoder_tokenizer or None)
    (row,) = encoder_rows(
        mode,
        records,
        [len(train)],
        [""],
        histories,
        tokenizer,
        run.cfg.data.max_encoder_tokens,
        clean=run.cfg.data.clean_encoder_text,
    )
    return row


def one_batch(run, text: str | None = None, user: str = "", item: str = "", check=True) -> dict:
    """The one-row batch for a conditioning ``text`` or for (``user``, ``item``)."""
    if check:  # errors for unseen ids the method reads, warnings for the others
        _check_ids(run, user, item, text is not None)
    batch = {
        "example": np.zeros((1,), np.int32),
        "user": np.array([run.dataset.user_index.get(user, 0)], np.int32),
        "item": np.array([run.dataset.item_index.get(item, 0)], np.int32),
    }
    if run.model.spec.uses_encoder:
        if text is not None:
            tok = tokenizers.encoder_tokenizer(run.cfg.data.encoder_tokenizer or None)
            if run.cfg.data.clean_encoder_text:
                text = clean_text(text)  # as in training
            ids = tok(text, truncation=True, max_length=run.cfg.data.max_encoder_tokens)
            ids = ids["input_ids"]
        else:
            ids = encoder_input_for(run, user, item)
        batch["encoder_ids"] = np.array([ids], np.int32)
        batch["encoder_mask"] = np.ones((1, len(ids)), np.int32)
    return batch


def generate_one(run, text: str | None = None, user: str = "", item: str = "") -> str:
    """The review the model writes for a conditioning ``text`` or for (``user``, ``item``)."""
    batch = one_batch(run, text, user, item)
    sampling = SamplingConfig.from_config(run.cfg.sampling)
    tokens = generate(run.model, run.params, batch, dataclasses.replace(sampling, batch_size=1))
    eos = run.model.spec.decoder.eos_token_id
    row = tokens[0].tolist()
    row = row[: row.index(eos)] if eos in row else row
    return run.dataset.decoder_tokenizer.decode(row, skip_special_tokens=True).strip()


def rate_one(run, text: str | None = None, user: str = "", item: str = "") -> float | None:
    """The predicted rating for the same input, clamped to the training split's range.

    None where the head cannot rate what was given: the ``none`` head, and heads that read
    ids (``mf``, ``mlp``, ``decoder`` under id-only conditioning) without a training user and
    item.
    """
    spec = run.model.spec
    knows_ids = user in run.dataset.user_index and item in run.dataset.item_index
    reads_text = head_reads_text(spec.rating, needs_encoder(spec.conditioning))
    if not spec.rating.predicts or not (reads_text or knows_ids):
        return None
    batch = one_batch(run, text, user, item, check=False)  # generate_one checked them
    batch = {k: v for k, v in batch.items() if k != "example"}
    rating = float(run.model.apply({"params": run.params}, batch, method="predict_rating")[0])
    low, high = run.dataset.rating_range
    return min(max(rating, low), high)
