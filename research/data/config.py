"""Data settings: every key with its default, the valid values of the enumerated ones, checks.

The central config puts this dict under ``data``; error messages name keys as ``data.<key>``.
"""

from __future__ import annotations

import math

import ml_collections

SPLITS = ("train", "validation", "test")

DATA_CHOICES: dict[str, tuple] = {
    "source": ("synthetic", "pepler", "amazon", "yelp", "csv", "jsonl"),
    "on_bad_row": ("error", "skip"),
    "target": ("review", "first_sentence", "template", "summary"),
    "encoder_input": (
        "none",
        "review",
        "user_history",
        "item_history",
        "user_item_history",
        "features",
    ),
}

# Hard limit of BERT-family position tables.
MAX_ENCODER_POSITIONS = 512


def data_config() -> ml_collections.ConfigDict:
    """Default data settings (the small synthetic corpus, user+item histories as encoder input)."""
    cfg = ml_collections.ConfigDict()
    # Where the reviews come from; `path` is the file (pepler: reviews.pickle).
    cfg.source = "synthetic"
    cfg.path = ""
    # PEPLER split folder holding train.index/validation.index/test.index, e.g. ".../1".
    # Empty: split with split_ratios/split_seed instead.
    cfg.index_dir = ""
    # csv/jsonl: which column holds each field. Empty = the file has no such column.
    # csv features cells are "|"-separated; jsonl features are a list of strings or one string.
    cfg.columns = ml_collections.ConfigDict(
        {
            "user": "user",
            "item": "item",
            "rating": "rating",
            "text": "text",
            "timestamp": "",
            "features": "",
            "summary": "",
        }
    )
    # How text timestamps are read: "" = epoch seconds or ISO 8601 ("2017-07-30 07:44:10",
    # "2017-07-30T07:44:10-07:00"); else a strptime format, e.g. "%a %b %d %H:%M:%S %z %Y".
    cfg.timestamp_format = ""
    # Rows with a missing field, empty text, wrong type, invalid UTF-8 or invalid JSON:
    # "error" stops at the first one naming file and line; "skip" drops and counts them by reason
    # in the data report (workdir/data_report.json).
    cfg.on_bad_row = "error"
    # train:validation:test for the seeded split (used when index_dir is empty).
    cfg.split_ratios = (0.8, 0.1, 0.1)
    cfg.split_seed = 0
    # Seeded split only: put at least one review of every user and every item in train (as
    # PETER's splits do), so no validation/test user or item is unseen.
    cfg.keep_test_entities_in_train = True
    # Decoder target: the review text, its first sentence, PEPLER's template sentence, or the
    # summary (title); cut to max_target_tokens decoder tokens, then wrapped in BOS/EOS.
    cfg.target = "review"
    cfg.max_target_tokens = 20
    # What the encoder reads; histories use only training reviews, newest first.
    cfg.encoder_input = "user_item_history"
    cfg.max_encoder_tokens = 128
    # Strip punctuation and collapse whitespace in every text the encoder reads, as PEPLER's
    # published preprocessing does (research/data/encoder_inputs.py). Off: the raw text.
    cfg.clean_encoder_text = False
    # Padded lengths (tokens incl. BOS/EOS resp. [CLS]/[SEP]). A batch gets the smallest bucket
    # that fits its longest row. Buckets above the largest possible length
    # (max_target_tokens + 2, resp. max_encoder_tokens) are replaced by that length, so the
    # longest row always fits and jit sees at most len(buckets) shapes per side.
    cfg.target_buckets = (8, 12, 16, 22)
    cfg.encoder_buckets = (32, 64, 128)
    # Folder for the tokenisation cache; empty = no cache.
    cfg.cache_dir = ""
    # Tokenizer folders; empty = those of init.decoder/init.encoder when they are folders,
    # else GPT-2's BPE (decoder) and all-MiniLM-L6-v2's (encoder).
    cfg.decoder_tokenizer = ""
    cfg.encoder_tokenizer = ""
    # The controllable corpus of research/data/synthetic.py.
    cfg.synthetic = ml_collections.ConfigDict(
        {"num_users": 40, "num_items": 30, "num_reviews": 1200, "seed": 0, "num_aspects": 4}
    )
    return cfg


def _choice_error(key: str, value, valid: tuple) -> ValueError:
    return ValueError(f"data.{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _positive_ints(cfg, key: str) -> None:
    values = tuple(cfg[key])
    if not values or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"data.{key}={values!r} must be a non-empty list of positive integers")


def _check_source_has_fields(cfg) -> None:
    """Targets and encoder inputs that need a field only some sources have."""
    if cfg.source in ("csv", "jsonl"):
        for name in ("user", "item", "text"):
            if not cfg.columns[name]:
                raise ValueError(
                    f"data.columns.{name} is empty; data.source={cfg.source!r} needs it"
                )
    needs = {
        ("target", "template"): (("pepler", "synthetic"), None),
        ("target", "summary"): (("amazon", "synthetic"), "summary"),
        ("encoder_input", "features"): (("pepler", "synthetic"), "features"),
    }
    for (key, value), (sources, column) in needs.items():
        if cfg[key] != value or cfg.source in sources:
            continue
        if column and cfg.source in ("csv", "jsonl"):
            if not cfg.columns[column]:
                raise ValueError(f"data.{key}={value!r} needs data.columns.{column} to be set")
            continue
        also = f", or csv/jsonl with data.columns.{column}" if column else ""
        raise ValueError(
            f"data.{key}={value!r} needs a field that data.source={cfg.source!r} lacks; "
            f"use data.source {' or '.join(sources)}{also}"
        )


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` naming the first bad ``data.<key>`` and what it may be."""
    for key, valid in DATA_CHOICES.items():
        if cfg[key] not in valid:
            raise _choice_error(key, cfg[key], valid)
    if cfg.source != "synthetic" and not cfg.path:
        raise ValueError(f"data.path is empty; data.source={cfg.source!r} reads a file")
    if cfg.index_dir and cfg.source != "pepler":
        raise ValueError(
            f"data.index_dir is set but data.source={cfg.source!r}; split folders are for pepler"
        )
    ratios = tuple(cfg.split_ratios)
    if len(ratios) != 3 or min(ratios) < 0 or not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"data.split_ratios={ratios!r} must be three non-negative numbers "
            "(train, validation, test) summing to 1"
        )
    if not isinstance(cfg.max_target_tokens, int) or cfg.max_target_tokens < 1:
        raise ValueError(f"data.max_target_tokens={cfg.max_target_tokens!r} must be >= 1")
    if not isinstance(cfg.max_encoder_tokens, int) or not (
        3 <= cfg.max_encoder_tokens <= MAX_ENCODER_POSITIONS
    ):
        raise ValueError(
            f"data.max_encoder_tokens={cfg.max_encoder_tokens!r} must be between 3 and "
            f"{MAX_ENCODER_POSITIONS} (the encoder's position table)"
        )
    _check_source_has_fields(cfg)
    _positive_ints(cfg, "target_buckets")
    _positive_ints(cfg, "encoder_buckets")
    for key in ("num_users", "num_items", "num_reviews"):
        if cfg.synthetic[key] < 1:
            raise ValueError(f"data.synthetic.{key}={cfg.synthetic[key]!r} must be >= 1")


def effective_buckets(buckets, longest: int) -> tuple[int, ...]:
    """Sorted bucket lengths, capped so the last one is exactly ``longest``."""
    return tuple(sorted({b for b in buckets if b < longest})) + (longest,)
