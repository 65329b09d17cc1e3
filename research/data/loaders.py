"""Loaders: every supported file format to a list of ``Review`` plus a bad-row report.

Formats (``data.source``):

* ``pepler``: PEPLER/PETER ``reviews.pickle``, a list of dicts with ``user``, ``item``,
  ``rating`` and ``template = (feature, adjective, sentence, sentiment)``, loaded with the
  restricted unpickler of ``safe_pickle`` (no code runs). The text is the template sentence.
  Optional split folder (``data.index_dir``) with ``train.index``, ``validation.index`` and
  ``test.index``: whitespace-separated positions in the pickle's list.
* ``amazon``: Amazon review JSON lines, 2014 or 2018 release (``reviewerID``, ``asin``,
  ``overall``, ``reviewText``; optional ``summary``, ``unixReviewTime``; other fields such as
  2018's ``style`` are ignored).
* ``yelp``: Yelp ``review.json`` lines (``user_id``, ``business_id``, ``stars``, ``text``;
  optional ``date`` as "YYYY-MM-DD HH:MM:SS", read as UTC).
* ``csv`` / ``jsonl``: any columns, named by ``data.columns``. user/item/text (and rating
  when mapped) must be present in every row; mapped timestamp/features/summary may be absent or
  empty in a row. CSV features cells are "|"-separated; CSV rating cells are parsed as numbers.

Timestamps (every source) are epoch seconds, ISO 8601 text, or text in the strptime format
``data.timestamp_format`` (see ``research.data.rows.parse_timestamp``); zoneless times are UTC.

JSON-lines and CSV files may be gzip-compressed (detected from the content). Lines are
numbered from 1 (a CSV header is line 1); pickle records by their list position. A compressed
file that ends early or is damaged is a :class:`DataFileError` naming the file and its last
complete line, also under ``data.on_bad_row=skip``: a truncated file is not a bad row, and
skipping would quietly train on part of the data.

Bad rows: ``missing_field`` (absent or null), ``empty_text`` (the target text is empty or
blank), ``wrong_type``, ``invalid_utf8``, ``invalid_json``, and for CSV ``malformed_row`` (a
cell count that differs from the header). With ``data.on_bad_row=error`` the first one raises
``BadRowError`` naming file, line and field; with ``skip`` it is dropped and counted, and a
file whose every row is bad raises ``BadRowError`` with the counts as soon as it is read.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

import ml_collections

from research.data.config import SPLITS
from research.data.records import Review
from research.data.rows import BadRow, amazon_row, mapped_row, pepler_row, type_name, yelp_row
from research.data.safe_pickle import restricted_load
from research.data.synthetic import synthetic_reviews
from research.errors import ExpectedError

# Bad-row examples kept per reason in the report: enough to find the problem, not a copy.
_EXAMPLES_PER_REASON = 5
_GZIP_MAGIC = b"\x1f\x8b"


class BadRowError(ExpectedError, ValueError):
    """A bad row under ``data.on_bad_row=error``; the message names file, line and field."""


class DataFileError(ExpectedError):
    """A data file that cannot be read whole (truncated, damaged, a directory); names it."""


# What a gzip stream that ends early or holds garbage raises while it is read.
_DAMAGED_STREAM = (EOFError, zlib.error, gzip.BadGzipFile)


def _damaged(path: Path, last_complete: int, error: Exception) -> DataFileError:
    return DataFileError(
        f"{path}: the compressed file is truncated or damaged after line {last_complete}, its "
        f"last complete line ({error}); restore the whole file (a partial file is not skipped)"
    )


@dataclass
class BadRowReport:
    """Counts of rows read, kept and skipped by reason, with the first few locations."""

    on_bad_row: str
    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def bad_row(self, location: str, problem: BadRow) -> None:
        message = f"{location}: {problem.reason.replace('_', ' ')}: {problem.detail}"
        if self.on_bad_row == "error":
            raise BadRowError(f"{message} (set data.on_bad_row=skip to skip and count such rows)")
        self.skipped[problem.reason] += 1
        examples = self.examples.setdefault(problem.reason, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(message)

    def summary(self) -> str:
        """One line: counts by reason and the first example of each."""
        parts = [
            f"{self.skipped[reason]} {reason} (first: {self.examples[reason][0]})"
            for reason in sorted(self.skipped)
        ]
        return f"{self.rows_read} rows read, skipped: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "on_bad_row": self.on_bad_row,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_read - sum(self.skipped.values()),
            "skipped": {reason: self.skipped[reason] for reason in sorted(self.skipped)},
            "examples": self.examples,
        }


@dataclass
class LoadedData:
    """Records in file order, the report, the files read, and the dataset's own split (if any).

    ``splits`` maps split name to positions in ``records`` (PEPLER index folders), else None.
    ``dropped_index_entries`` counts index entries per split that pointed at skipped rows.
    """

    records: list[Review]
    report: BadRowReport
    files: list[Path]
    splits: dict[str, list[int]] | None = None
    dropped_index_entries: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# File readers.


def _check_file(path: Path, key: str = "data.path") -> None:
    if path.is_dir():
        raise DataFileError(f"data file {path} is a directory ({key}); name the file in it")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist ({key})")


def _open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it is gzip; streamed, so any size fits in memory."""
    _check_file(path)
    with path.open("rb") as file:
        compressed = file.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else path.open("rb")


def _json_lines(path: Path) -> Iterator[tuple[int, dict | BadRow]]:
    """(line number, parsed object or the problem) for each non-blank line."""
    with _open_binary(path) as file:
        lines = enumerate(file, start=1)
        number = 0
        while True:
            try:
                number, line = next(lines)
            except StopIteration:
                return
            except _DAMAGED_STREAM as error:
                raise _damaged(path, number, error) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield number, BadRow("invalid_utf8", f"byte {error.start}: {error.reason}")
            except json.JSONDecodeError as error:
                yield number, BadRow("invalid_json", str(error))
            else:
                if isinstance(row, dict):
                    yield number, row
                else:
                    yield (
                        number,
                        BadRow("invalid_json", f"expected an object, got a {type_name(row)}"),
                    )


def _has_undecodable(cell: str) -> bool:
    # Bytes that are not UTF-8 decode to U+DC80..U+DCFF under "surrogateescape".
    return any("\udc80" <= char <= "\udcff" for char in cell)


def _csv_rows(path: Path, columns) -> Iterator[tuple[int, dict | BadRow]]:
    """(first line number, {header: cell} or the problem) for each CSV row after the header."""
    with _open_binary(path) as binary:
        reader = csv.reader(
            io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape", newline="")
        )
        header = next(reader, None)
        if header is None or any(_has_undecodable(cell) for cell in header):
            raise ValueError(f"{path}:1: expected a UTF-8 CSV header row")
        for name in columns:
            if columns[name] and columns[name] not in header:
                raise ValueError(
                    f"{path}:1: data.columns.{name}={columns[name]!r} is not a column; "
                    f"header: {header}"
                )
        previous_end = reader.line_num
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except _DAMAGED_STREAM as error:
                raise _damaged(path, previous_end, error) from None
            except csv.Error as error:  # e.g. a cell over the csv module's size limit
                start, previous_end = previous_end + 1, reader.line_num
                yield start, BadRow("malformed_row", str(error))
                continue
            start, previous_end = previous_end + 1, reader.line_num
            if not cells:
                continue
            if any(_has_undecodable(cell) for cell in cells):
                yield start, BadRow("invalid_utf8", "the row holds bytes that are not UTF-8")
            elif len(cells) != len(header):
                problem = f"{len(cells)} cells but the header has {len(header)}"
                yield start, BadRow("malformed_row", problem)
            else:
                yield start, dict(zip(header, cells, strict=True))


def _parse_rows(rows, path: Path, parse, report: BadRowReport) -> list[Review]:
    records, read_before = [], report.rows_read
    for number, row in rows:
        report.rows_read += 1
        try:
            if isinstance(row, BadRow):
                raise row
            records.append(parse(row))
        except BadRow as problem:
            report.bad_row(f"{path}:{number}", problem)
    if report.rows_read > read_before and not records:
        raise BadRowError(f"{path}: every row is bad, nothing to train on; {report.summary()}")
    return records


def _read_index(path: Path, num_rows: int) -> list[int]:
    if not path.is_file():
        raise FileNotFoundError(f"split index file {path} does not exist (data.index_dir)")
    positions = []
    for token in path.read_text().split():
        try:
            position = int(token)
        except ValueError:
            raise ValueError(f"{path}: {token!r} is not an integer record position") from None
        if not 0 <= position < num_rows:
            raise ValueError(f"{path}: position {position} is outside the {num_rows} records")
        positions.append(position)
    if len(set(positions)) != len(positions):
        raise ValueError(f"{path}: a record position appears twice")
    return positions


def _load_pepler(cfg, report: BadRowReport) -> LoadedData:
    path = Path(cfg.path)
    _check_file(path)
    rows = restricted_load(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of review dicts, got a {type_name(rows)}")
    records, kept_at = [], {}
    for position, row in enumerate(rows):
        report.rows_read += 1
        try:
            review = pepler_row(row)
        except BadRow as problem:
            report.bad_row(f"{path}: record {position}", problem)
            continue
        kept_at[position] = len(records)
        records.append(review)
    loaded = LoadedData(records, report, [path])
    if cfg.index_dir:
        index_dir = Path(cfg.index_dir)
        loaded.splits, seen = {}, set()
        for split in SPLITS:
            index_path = index_dir / f"{split}.index"
            positions = _read_index(index_path, len(rows))
            if seen & set(positions):
                raise ValueError(f"{index_path}: shares record positions with an earlier split")
            seen |= set(positions)
            loaded.splits[split] = [kept_at[p] for p in positions if p in kept_at]
            loaded.dropped_index_entries[split] = len(positions) - len(loaded.splits[split])
            loaded.files.append(index_path)
    return loaded


def load_records(cfg: ml_collections.ConfigDict) -> LoadedData:
    """Read ``data.source`` at ``data.path`` (or generate the synthetic corpus)."""
    report = BadRowReport(cfg.on_bad_row)
    target_field = "summary" if cfg.target == "summary" else "text"
    if cfg.source == "synthetic":
        records = synthetic_reviews(**cfg.synthetic.to_dict())
        report.rows_read = len(records)
        return LoadedData(records, report, [])
    if cfg.source == "pepler":
        return _load_pepler(cfg, report)
    path = Path(cfg.path)
    fmt = cfg.timestamp_format
    parse = {
        "amazon": partial(amazon_row, target_field=target_field, timestamp_format=fmt),
        "yelp": partial(yelp_row, timestamp_format=fmt),
        "jsonl": partial(
            mapped_row,
            columns=cfg.columns,
            target_field=target_field,
            text_cells=False,
            timestamp_format=fmt,
        ),
        "csv": partial(
            mapped_row,
            columns=cfg.columns,
            target_field=target_field,
            text_cells=True,
            timestamp_format=fmt,
        ),
    }[cfg.source]
    rows = _csv_rows(path, cfg.columns) if cfg.source == "csv" else _json_lines(path)
    return LoadedData(_parse_rows(rows, path, parse, report), report, [path])
