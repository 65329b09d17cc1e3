"""Row parsers: one raw row (a JSON object, a CSV row's cells, a PEPLER dict) to a ``Review``.

The field readers check one field each (present, of the right type, finite, valid UTF-8) and
raise :class:`BadRow` with the reason; the per-format row parsers (``amazon_row``,
``yelp_row``, ``mapped_row``, ``pepler_row``) build the ``Review``. Reading files, and adding
file and line to a bad row, is ``research.data.loaders``' job.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from research.data.records import Review

CSV_FEATURE_SEPARATOR = "|"


class BadRow(Exception):
    """One row's problem: ``reason`` (e.g. ``missing_field``) and ``detail``, without a location."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Field readers: raise BadRow with the reason; the caller adds file and line.


def _required(row: dict, key: str):
    value = row.get(key)
    if value is None:
        raise BadRow("missing_field", f"field '{key}' is missing or null")
    return value


def type_name(value) -> str:
    return type(value).__name__


def _identifier(row: dict, key: str) -> str:
    value = _required(row, key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadRow("wrong_type", f"field '{key}' is a {type_name(value)}, expected a string")
    value = str(value).strip()
    if not value:
        raise BadRow("missing_field", f"field '{key}' is empty")
    return value


def _number(value, key: str, text_cells: bool = False) -> float:
    """A finite number; ``text_cells`` (CSV) parses it from text, "" being a missing value."""
    if text_cells:
        if value == "":
            raise BadRow("missing_field", f"field '{key}' is empty")
        try:
            value = float(value)
        except ValueError:
            raise BadRow("wrong_type", f"field '{key}'={value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRow("wrong_type", f"field '{key}' is a {type_name(value)}, expected a number")
    if not math.isfinite(value):
        raise BadRow("wrong_type", f"field '{key}'={value!r} is not a finite number")
    return float(value)


def parse_timestamp(value, key: str, fmt: str = "", text_cells: bool = False) -> int | None:
    """Seconds since the epoch from a number, a numeric string, ISO 8601 text, or ``fmt``.

    ``fmt`` (``data.timestamp_format``) is a ``datetime.strptime`` format, e.g. Twitter-style
    ``"%a %b %d %H:%M:%S %z %Y"``; without one, text must be epoch seconds or ISO 8601 (e.g.
    ``2017-07-30``, ``2017-07-30 07:44:10``, ``2017-07-30T07:44:10-07:00``). Times without a
    zone are read as UTC. None or an empty cell means no timestamp.
    """
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            if fmt:
                parsed = datetime.strptime(text, fmt)
            elif _is_number(text):
                value, text_cells = text, True
                parsed = None
            else:
                parsed = datetime.fromisoformat(text)
        except ValueError:
            expected = (
                f"data.timestamp_format={fmt!r}"
                if fmt
                else "epoch seconds or ISO 8601 (for other text set data.timestamp_format "
                "to a strptime format, e.g. '%a %b %d %H:%M:%S %z %Y')"
            )
            raise BadRow(
                "wrong_type", f"field '{key}'={value!r} does not match {expected}"
            ) from None
        if parsed is not None:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            return int(parsed.timestamp())
    number = _number(value, key, text_cells)
    if number != int(number):
        raise BadRow("wrong_type", f"field '{key}'={value!r} is not a whole number of seconds")
    return int(number)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _string(value, key: str) -> str:
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"field '{key}' is a {type_name(value)}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON "\ud800" escapes decode to lone surrogates that no tokenizer can encode.
        raise BadRow("invalid_utf8", f"field '{key}' holds a lone surrogate") from None
    return value


def _optional_string(row: dict, key: str) -> str:
    value = row.get(key) if key else None
    return "" if value is None else _string(value, key)


def _check_target(text: str, key: str) -> None:
    if not text.strip():
        raise BadRow("empty_text", f"field '{key}' is empty")


def _features(value, key: str, separator: str | None) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        parts = value.split(separator) if separator else [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = value
    else:
        raise BadRow(
            "wrong_type", f"field '{key}' is a {type_name(value)}, expected strings or a string"
        )
    return tuple(p.strip() for p in parts if p.strip())


# ---------------------------------------------------------------------------------------------
# Row parsers: one dict (a parsed JSON line or CSV row) to a Review.


def amazon_row(row: dict, target_field: str, timestamp_format: str = "") -> Review:
    review = Review(
        user=_identifier(row, "reviewerID"),
        item=_identifier(row, "asin"),
        rating=_number(_required(row, "overall"), "overall"),
        text=_string(_required(row, "reviewText"), "reviewText"),
        summary=_optional_string(row, "summary"),
        timestamp=parse_timestamp(row.get("unixReviewTime"), "unixReviewTime", timestamp_format),
    )
    if target_field == "summary":
        _check_target(review.summary, "summary")
    else:
        _check_target(review.text, "reviewText")
    return review


def yelp_row(row: dict, timestamp_format: str = "") -> Review:
    # Yelp's "YYYY-MM-DD HH:MM:SS" is ISO 8601 with a space; read as UTC.
    timestamp = parse_timestamp(row.get("date"), "date", timestamp_format)
    review = Review(
        user=_identifier(row, "user_id"),
        item=_identifier(row, "business_id"),
        rating=_number(_required(row, "stars"), "stars"),
        text=_string(_required(row, "text"), "text"),
        timestamp=timestamp,
    )
    _check_target(review.text, "text")
    return review


def mapped_row(
    row: dict, columns, target_field: str, text_cells: bool, timestamp_format: str = ""
) -> Review:
    """A row of named columns; ``text_cells``: CSV, where every cell is text."""
    rating = None
    if columns.rating:
        rating = _number(_required(row, columns.rating), columns.rating, text_cells)
    review = Review(
        user=_identifier(row, columns.user),
        item=_identifier(row, columns.item),
        rating=rating,
        text=_string(_required(row, columns.text), columns.text),
        features=_features(
            row.get(columns.features) if columns.features else None,
            columns.features,
            CSV_FEATURE_SEPARATOR if text_cells else None,
        ),
        timestamp=parse_timestamp(
            row.get(columns.timestamp) if columns.timestamp else None,
            columns.timestamp,
            timestamp_format,
            text_cells,
        ),
        summary=_optional_string(row, columns.summary),
    )
    if target_field == "summary":
        _check_target(review.summary, columns.summary)
    else:
        _check_target(review.text, columns.text)
    return review


def pepler_row(row) -> Review:
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"record is a {type_name(row)}, expected a dict")
    template = _required(row, "template")
    if not isinstance(template, tuple | list) or len(template) != 4:
        raise BadRow(
            "wrong_type",
            "field 'template' must be (feature, adjective, sentence, sentiment), "
            f"got a {type_name(template)}",
        )
    feature = _string(template[0], "template.feature")
    sentence = _string(template[2], "template.sentence")
    _check_target(sentence, "template.sentence")
    return Review(
        user=_identifier(row, "user"),
        item=_identifier(row, "item"),
        rating=_number(_required(row, "rating"), "rating"),
        text=sentence,
        features=(feature.strip(),) if feature.strip() else (),
        sentence=sentence,
    )
