r"""What the encoder reads (``data.encoder_input``), built without leaking the target.

* ``review``: the target text itself (the paraphrase setting: an upper bound, not a task).
* ``features``: the record's own aspect words joined with ", " (just [CLS] [SEP] without any).
* ``user_history``: the user's other reviews; ``item_history``: the item's other reviews;
  ``user_item_history``: both, as a BERT sentence pair
  ``[CLS] user: <user history> [SEP] item: <item history> [SEP]``.

Histories are built only from TRAINING reviews, newest first (by timestamp; reviews without one
come after those with one, then in file order), and leave out every review of the target's
(user, item) pair, so neither the target review nor a duplicate of it is ever shown. Reviews
within a history are joined with " [SEP] ". Cutting to ``max_tokens`` keeps a prefix of the
history, exactly as the encoder tokenizer would truncate the joined text; for the pair each
side keeps at most half unless the other side is shorter (the tokenizer's ``longest_first``,
except that an odd token goes to the user side rather than to the longer side, which would
need the full, untruncated lengths).

With ``clean`` (``data.clean_encoder_text``), every text the encoder reads first loses its
punctuation and has its whitespace collapsed, as the published PEPLER pipeline does
(``re.sub(r"[^\w\s]", "", text)``, then single spaces); the "user:"/"item:" labels and the
separators stay.

History token ids are concatenated from per-review token ids instead of tokenizing each joined
text: the same ids (WordPiece splits on whitespace first), but every review is tokenized once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from research.data.records import Review

HISTORY_SEPARATOR = " [SEP] "
FEATURE_SEPARATOR = ", "
USER_LABEL = "user:"
ITEM_LABEL = "item:"


_PUNCTUATION = re.compile(r"[^\w\s]")
_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Punctuation removed, whitespace runs collapsed to one space, stripped."""
    return _WHITESPACE.sub(" ", _PUNCTUATION.sub("", text)).strip()


@dataclass(frozen=True)
class Histories:
    """Training-review positions per user and per item, newest first."""

    by_user: dict[str, list[int]]
    by_item: dict[str, list[int]]


def training_histories(records: list[Review], train_positions: Iterable[int]) -> Histories:
    """Group the training positions by user and by item in history order (newest first)."""

    def newest_first(position: int):
        timestamp = records[position].timestamp
        return (timestamp is None, -(timestamp or 0), position)

    by_user: dict[str, list[int]] = {}
    by_item: dict[str, list[int]] = {}
    for position in sorted(train_positions, key=newest_first):
        by_user.setdefault(records[position].user, []).append(position)
        by_item.setdefault(records[position].item, []).append(position)
    return Histories(by_user, by_item)


def user_history(records: list[Review], histories: Histories, position: int) -> Iterator[int]:
    """The target user's training reviews of other items, newest first."""
    target = records[position]
    return (p for p in histories.by_user.get(target.user, ()) if records[p].item != target.item)


def item_history(records: list[Review], histories: Histories, position: int) -> Iterator[int]:
    """The target item's training reviews by other users, newest first."""
    target = records[position]
    return (p for p in histories.by_item.get(target.item, ()) if records[p].user != target.user)


def _joined(positions: Iterator[int], pieces: dict[int, list[int]], sep: int, budget: int):
    """The first ``budget`` ids of the pieces joined by ``sep``, reading no more than needed."""
    ids: list[int] = []
    for count, position in enumerate(positions):
        if len(ids) >= budget:
            break
        if count:
            ids.append(sep)
        ids.extend(pieces[position][: budget - len(ids)])
    return ids[:budget]


def _pair(first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut two sequences to ``budget`` in total: each keeps half (the first the odd token)
    unless the other needs less. Exact for lengths capped at ``budget``."""
    keep_first = min(len(first), max(budget - budget // 2, budget - len(second)))
    return first[:keep_first], second[: budget - keep_first]


def encoder_rows(
    mode: str,
    records: list[Review],
    positions: list[int],
    target_texts: list[str],
    histories: Histories,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    clean: bool = False,
) -> list[list[int]] | None:
    """Encoder token ids ([CLS] ... [SEP], at most ``max_tokens``) for ``records[positions]``.

    ``target_texts`` line up with ``positions`` (used by ``review``); None for mode ``none``.
    ``clean``: see the module docstring.
    """
    if mode == "none":
        return None
    prepare = clean_text if clean else (lambda text: text)
    if mode in ("review", "features"):
        texts = (
            [prepare(t) for t in target_texts]
            if mode == "review"
            else [FEATURE_SEPARATOR.join(map(prepare, records[p].features)) for p in positions]
        )
        return tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    # No single piece can use more than the whole budget, so tokenize no further.
    budget = max_tokens - 2
    train = sorted({p for group in histories.by_user.values() for p in group})
    pieces = {}
    if train:  # the tokenizer refuses an empty batch
        piece_ids = tokenizer(
            [prepare(records[p].text) for p in train],
            add_special_tokens=False,
            truncation=True,
            max_length=budget,
        )["input_ids"]
        pieces = dict(zip(train, piece_ids, strict=True))
    rows = []
    if mode == "user_item_history":
        user_label = tokenizer(USER_LABEL, add_special_tokens=False)["input_ids"]
        item_label = tokenizer(ITEM_LABEL, add_special_tokens=False)["input_ids"]
        budget = max_tokens - 3
        for position in positions:
            users = user_label + _joined(
                user_history(records, histories, position), pieces, sep, budget
            )
            items = item_label + _joined(
                item_history(records, histories, position), pieces, sep, budget
            )
            users, items = _pair(users, items, budget)
            rows.append([cls, *users, sep, *items, sep])
        return rows
    history = user_history if mode == "user_history" else item_history
    for position in positions:
        rows.append(
            [cls, *_joined(history(records, histories, position), pieces, sep, budget), sep]
        )
    return rows
