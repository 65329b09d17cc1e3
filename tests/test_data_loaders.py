"""Loaders: every format from small files written here, every bad-row case, the real Amazon file,
and the restricted unpickler."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import pytest

from research.data.config import data_config
from research.data.loaders import BadRowError, DataFileError, load_records
from research.data.records import Review
from research.data.safe_pickle import UnsafePickleError, restricted_load, restricted_loads

AMAZON_FILE = (
    Path(__file__).parents[1]
    / "../shared/data/amazon_musical_instruments_5/reviews_Musical_Instruments_5.json.gz"
).resolve()


def config(source: str, path: Path, **overrides):
    cfg = data_config()
    cfg.source, cfg.path = source, str(path)
    cfg.update(overrides)
    return cfg


def write_lines(path: Path, lines: list[bytes | str | dict], compress: bool = False) -> Path:
    """One line per entry: dicts become JSON, bytes are written as they are."""
    raw = b"".join(
        (json.dumps(x).encode() if isinstance(x, dict) else x.encode() if isinstance(x, str) else x)
        + b"\n"
        for x in lines
    )
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def amazon_2014(user="A1", item="B1", rating=5.0, text="Great strings.", **extra) -> dict:
    row = {
        "reviewerID": user,
        "asin": item,
        "reviewerName": "someone",
        "helpful": [0, 0],
        "reviewText": text,
        "overall": rating,
        "summary": "Five stars",
        "unixReviewTime": 1393545600,
        "reviewTime": "02 28, 2014",
    }
    row.update(extra)
    return row


# ---------------------------------------------------------------------------------------------
# Formats.


@pytest.mark.parametrize("compress", [False, True])
def test_amazon_2014_plain_and_gzip(tmp_path, compress):
    path = write_lines(
        tmp_path / ("r.json.gz" if compress else "r.json"),
        [amazon_2014(), amazon_2014("A2", "B2", 3.0, "Okay. Not more.")],
        compress,
    )
    loaded = load_records(config("amazon", path))
    assert loaded.records == [
        Review("A1", "B1", 5.0, "Great strings.", timestamp=1393545600, summary="Five stars"),
        Review("A2", "B2", 3.0, "Okay. Not more.", timestamp=1393545600, summary="Five stars"),
    ]
    assert loaded.report.to_dict()["rows_kept"] == 2


def test_amazon_2018_fields(tmp_path):
    row_2018 = {
        "overall": 4.0,
        "vote": "2",
        "verified": True,
        "reviewTime": "09 1, 2016",
        "reviewerID": "AUSER",
        "asin": "0001",
        "style": {"Size:": " Large", "Color:": " Charcoal"},
        "reviewerName": "x",
        "reviewText": "Fits well.",
        "summary": "Good",
        "unixReviewTime": 1472688000,
    }
    loaded = load_records(config("amazon", write_lines(tmp_path / "r.json", [row_2018])))
    assert loaded.records == [
        Review("AUSER", "0001", 4.0, "Fits well.", timestamp=1472688000, summary="Good")
    ]


def test_yelp(tmp_path):
    rows = [
        {
            "review_id": "r1",
            "user_id": "U1",
            "business_id": "BZ",
            "stars": 4,
            "useful": 0,
            "text": "Nice food.",
            "date": "2016-03-09 00:00:00",
        },
        {"user_id": "U2", "business_id": "BZ", "stars": 2.0, "text": "Slow."},
    ]
    loaded = load_records(config("yelp", write_lines(tmp_path / "review.json", rows)))
    # 2016-03-09T00:00:00Z
    assert loaded.records == [
        Review("U1", "BZ", 4.0, "Nice food.", timestamp=1457481600),
        Review("U2", "BZ", 2.0, "Slow."),
    ]


def test_csv_with_column_mapping(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text(
        "who,what,stars,body,when,aspects,title\n"
        'u1,i1,5,"Loud, clear\nand warm.",100,sound|volume,Yes\n'
        "u2,i2,1,Broke.,,,\n"
    )
    cfg = config("csv", path)
    cfg.columns.update(
        dict(
            user="who",
            item="what",
            rating="stars",
            text="body",
            timestamp="when",
            features="aspects",
            summary="title",
        )
    )
    assert load_records(cfg).records == [
        Review("u1", "i1", 5.0, "Loud, clear\nand warm.", ("sound", "volume"), 100, "Yes"),
        Review("u2", "i2", 1.0, "Broke."),
    ]


def test_jsonl_with_column_mapping_and_no_rating(tmp_path):
    rows = [
        {"uid": 7, "iid": "x", "review": "Good.", "tags": ["fit", "price"]},
        {"uid": "8", "iid": "y", "review": "Bad.", "tags": "color"},
    ]
    cfg = config("jsonl", write_lines(tmp_path / "r.jsonl", rows))
    cfg.columns.update(dict(user="uid", item="iid", rating="", text="review", features="tags"))
    assert load_records(cfg).records == [
        Review("7", "x", None, "Good.", ("fit", "price")),
        Review("8", "y", None, "Bad.", ("color",)),
    ]


# 2017-07-30T14:44:10Z, written in the forms real files use.
WHEN = 1501425850
TIMESTAMPS = {
    "epoch number": (WHEN, ""),
    "epoch text": (str(WHEN), ""),
    "ISO 8601 with zone": ("2017-07-30T07:44:10-07:00", ""),
    "ISO 8601 Z": ("2017-07-30T14:44:10Z", ""),
    "ISO 8601 zoneless (UTC)": ("2017-07-30 14:44:10", ""),
    "Twitter style": ("Sun Jul 30 07:44:10 -0700 2017", "%a %b %d %H:%M:%S %z %Y"),
    "day/month/year": ("30/07/2017 14:44:10", "%d/%m/%Y %H:%M:%S"),
}


@pytest.mark.parametrize("source", ["jsonl", "csv"])
@pytest.mark.parametrize("case", TIMESTAMPS)
def test_timestamp_formats(tmp_path, source, case):
    value, fmt = TIMESTAMPS[case]
    if source == "csv":
        path = tmp_path / "r.csv"
        path.write_text(f'user,item,rating,text,when\nu,i,5,Good.,"{value}"\n')
    else:
        row = {"user": "u", "item": "i", "rating": 5, "text": "Good.", "when": value}
        path = write_lines(tmp_path / "r.jsonl", [row])
    cfg = config(source, path, timestamp_format=fmt)
    cfg.columns.timestamp = "when"
    assert load_records(cfg).records[0].timestamp == WHEN


def test_yelp_and_amazon_dates_in_other_formats(tmp_path):
    yelp = {"user_id": "U", "business_id": "B", "stars": 4, "text": "Ok.", "date": "2017-07-30"}
    cfg = config("yelp", write_lines(tmp_path / "y.json", [yelp]))
    assert load_records(cfg).records[0].timestamp == WHEN - (14 * 3600 + 44 * 60 + 10)
    amazon = amazon_2014(unixReviewTime="Sun Jul 30 07:44:10 -0700 2017")
    cfg = config("amazon", write_lines(tmp_path / "a.json", [amazon]))
    cfg.timestamp_format = "%a %b %d %H:%M:%S %z %Y"
    assert load_records(cfg).records[0].timestamp == WHEN


def test_bad_timestamp_names_file_line_and_expected_format(tmp_path):
    rows = [{"user": "u", "item": "i", "text": "A.", "when": "2017-07-30"}] * 2
    rows.append({"user": "u", "item": "i", "text": "B.", "when": "30.07.2017"})
    cfg = config("jsonl", write_lines(tmp_path / "r.jsonl", rows), timestamp_format="%Y-%m-%d")
    cfg.columns.update(rating="", timestamp="when")
    with pytest.raises(
        BadRowError,
        match=r"r\.jsonl:3: wrong type: field 'when'='30\.07\.2017' does not match "
        r"data\.timestamp_format='%Y-%m-%d'",
    ):
        load_records(cfg)


def test_file_of_only_bad_rows_errors_at_once_with_the_counts(tmp_path):
    rows = [{"user": "u", "item": "i", "text": "A.", "when": "Sun Jul 30 07:44:10 -0700 2017"}]
    cfg = config("jsonl", write_lines(tmp_path / "r.jsonl", rows * 3), on_bad_row="skip")
    cfg.columns.update(rating="", timestamp="when")
    with pytest.raises(BadRowError) as error:
        load_records(cfg)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'r.jsonl'}: every row is bad")
    assert "3 rows read, skipped: 3 wrong_type (first: " in message
    assert "r.jsonl:1: wrong type: field 'when'" in message and "timestamp_format" in message


def test_csv_missing_column_names_the_key(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating,body\nu,i,1,t\n")
    with pytest.raises(ValueError, match=r"r\.csv:1: data\.columns\.text='text' is not a column"):
        load_records(config("csv", path))


# ---------------------------------------------------------------------------------------------
# Bad rows: each case alone raises an error naming file, line and field; all together in skip
# mode are dropped and counted by reason.

JSON_BAD_ROWS = {
    "invalid_json": (b'{"reviewerID": "A9", "asin": ', r"invalid json: Expecting value"),
    "invalid_utf8": (
        b'{"reviewerID": "A9", "asin": "B9", "overall": 1.0, "reviewText": "caf\xe9"}',
        r"invalid utf8: byte \d+",
    ),
    "lone_surrogate": (
        b'{"reviewerID": "A9", "asin": "B9", "overall": 1.0, "reviewText": "x\\ud800"}',
        r"invalid utf8: field 'reviewText' holds a lone surrogate",
    ),
    "not_an_object": (b"[1, 2]", r"invalid json: expected an object, got a list"),
    "missing_field": (
        json.dumps({"reviewerID": "A9", "overall": 1.0, "reviewText": "x"}),
        r"missing field: field 'asin' is missing or null",
    ),
    "null_field": (
        json.dumps(amazon_2014(rating=None)),
        r"missing field: field 'overall' is missing or null",
    ),
    "wrong_type_rating": (
        json.dumps(amazon_2014(rating="five")),
        r"wrong type: field 'overall' is a str, expected a number",
    ),
    "wrong_type_text": (
        json.dumps(amazon_2014(text=["a"])),
        r"wrong type: field 'reviewText' is a list, expected a string",
    ),
    "wrong_type_time": (
        json.dumps(amazon_2014(unixReviewTime="soon")),
        r"wrong type: field 'unixReviewTime'='soon' does not match epoch seconds or ISO 8601",
    ),
    "empty_text": (json.dumps(amazon_2014(text=" \n ")), r"empty text: field 'reviewText'"),
}


@pytest.mark.parametrize("case", sorted(JSON_BAD_ROWS))
def test_json_bad_row_error_names_file_line_and_field(tmp_path, case):
    bad, message = JSON_BAD_ROWS[case]
    path = write_lines(tmp_path / "r.json.gz", [amazon_2014(), bad], compress=True)
    with pytest.raises(BadRowError, match=rf"^{path}:2: {message}.*data\.on_bad_row=skip"):
        load_records(config("amazon", path))


def test_json_bad_rows_skipped_and_counted(tmp_path):
    lines = [amazon_2014()] + [bad for bad, _ in JSON_BAD_ROWS.values()] + [amazon_2014("A3")]
    path = write_lines(tmp_path / "r.json", lines)
    loaded = load_records(config("amazon", path, on_bad_row="skip"))
    assert [r.user for r in loaded.records] == ["A1", "A3"]
    report = loaded.report.to_dict()
    assert report["rows_read"] == len(lines)
    assert report["rows_kept"] == 2
    assert report["skipped"] == {
        "empty_text": 1,
        "invalid_json": 2,
        "invalid_utf8": 2,
        "missing_field": 2,
        "wrong_type": 3,
    }
    assert report["examples"]["empty_text"] == [
        f"{path}:{len(lines) - 1}: empty text: field 'reviewText' is empty"
    ]


def test_yelp_bad_date(tmp_path):
    row = {"user_id": "U", "business_id": "B", "stars": 1, "text": "x", "date": "March 9"}
    path = write_lines(tmp_path / "review.json", [row])
    with pytest.raises(BadRowError, match=rf"{path}:1: wrong type: field 'date'='March 9'"):
        load_records(config("yelp", path))


CSV_HEADER = b"user,item,rating,text\n"
CSV_BAD_ROWS = {
    "invalid_utf8": (b"u9,i9,1,caf\xe9\n", r"invalid utf8"),
    "malformed_row": (b"u9,i9,1\n", r"malformed row: 3 cells but the header has 4"),
    "missing_field": (b",i9,1,text\n", r"missing field: field 'user' is empty"),
    "missing_rating": (b"u9,i9,,text\n", r"missing field: field 'rating' is empty"),
    "wrong_type": (b"u9,i9,abc,text\n", r"wrong type: field 'rating'='abc' is not a number"),
    "empty_text": (b'u9,i9,1,"  "\n', r"empty text: field 'text' is empty"),
    "huge_cell": (
        b"u9,i9,1," + b"x" * 200_000 + b"\n",
        r"malformed row: field larger than field limit",
    ),
}


@pytest.mark.parametrize("case", sorted(CSV_BAD_ROWS))
def test_csv_bad_row_error(tmp_path, case):
    bad, message = CSV_BAD_ROWS[case]
    path = tmp_path / "r.csv"
    # A quoted cell spanning two lines: the bad row starts on line 4.
    path.write_bytes(CSV_HEADER + b'u1,i1,5,"two\nlines"\n' + bad)
    with pytest.raises(BadRowError, match=rf"^{path}:4: {message}"):
        load_records(config("csv", path))


def test_csv_bad_rows_skipped_and_counted(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes(CSV_HEADER + b"".join(b for b, _ in CSV_BAD_ROWS.values()) + b"u1,i1,2,ok\n")
    loaded = load_records(config("csv", path, on_bad_row="skip"))
    assert loaded.records == [Review("u1", "i1", 2.0, "ok")]
    assert loaded.report.to_dict()["skipped"] == {
        "empty_text": 1,
        "invalid_utf8": 1,
        "malformed_row": 2,
        "missing_field": 2,
        "wrong_type": 1,
    }


# ---------------------------------------------------------------------------------------------
# PEPLER pickles and the restricted unpickler.


def pepler_row(user="u", item="i", rating=4, sentence="the strings are good", feature="strings"):
    return {
        "user": user,
        "item": item,
        "rating": rating,
        "template": (feature, "good", sentence, 1),
        "predicted": "",
    }


def write_pepler(folder: Path, rows: list, splits: dict[str, list[int]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reviews.pickle").write_bytes(pickle.dumps(rows, protocol=4))
    for name, positions in (splits or {}).items():
        (folder / "1").mkdir(exist_ok=True)
        (folder / "1" / f"{name}.index").write_text(" ".join(map(str, positions)))
    return folder / "reviews.pickle"


def test_pepler_pickle_with_index_folder(tmp_path):
    rows = [pepler_row(f"u{k}", f"i{k % 2}", sentence=f"sentence {k}") for k in range(6)]
    path = write_pepler(tmp_path, rows, {"train": [5, 0, 2], "validation": [1], "test": [3, 4]})
    loaded = load_records(config("pepler", path, index_dir=str(tmp_path / "1")))
    assert loaded.records[3] == Review(
        "u3", "i1", 4.0, "sentence 3", features=("strings",), sentence="sentence 3"
    )
    assert loaded.splits == {"train": [5, 0, 2], "validation": [1], "test": [3, 4]}
    assert loaded.files == [path] + [
        tmp_path / "1" / f"{s}.index" for s in ("train", "validation", "test")
    ]


PEPLER_BAD_ROWS = {
    "not_a_dict": (["u", "i"], r"wrong type: record is a list, expected a dict"),
    "missing_template": (
        {"user": "u", "item": "i", "rating": 1},
        r"missing field: field 'template' is missing or null",
    ),
    "short_template": (
        {"user": "u", "item": "i", "rating": 1, "template": ("a", "b")},
        r"wrong type: field 'template' must be \(feature, adjective, sentence, sentiment\)",
    ),
    "wrong_type_rating": (pepler_row(rating="4"), r"wrong type: field 'rating' is a str"),
    "empty_sentence": (pepler_row(sentence=""), r"empty text: field 'template.sentence'"),
}


@pytest.mark.parametrize("case", sorted(PEPLER_BAD_ROWS))
def test_pepler_bad_row_error(tmp_path, case):
    bad, message = PEPLER_BAD_ROWS[case]
    path = write_pepler(tmp_path, [pepler_row(), bad])
    with pytest.raises(BadRowError, match=rf"^{path}: record 1: {message}"):
        load_records(config("pepler", path))


def test_pepler_bad_rows_skipped_and_index_entries_remapped(tmp_path):
    bad = [row for row, _ in PEPLER_BAD_ROWS.values()]
    # Positions 0 and 6 are good; 1..5 are bad.
    rows = [pepler_row("u0")] + bad + [pepler_row("u6")]
    path = write_pepler(tmp_path, rows, {"train": [0, 1, 2], "validation": [6], "test": [3]})
    loaded = load_records(config("pepler", path, index_dir=str(tmp_path / "1"), on_bad_row="skip"))
    assert [r.user for r in loaded.records] == ["u0", "u6"]
    assert loaded.splits == {"train": [0], "validation": [1], "test": []}
    assert loaded.dropped_index_entries == {"train": 2, "validation": 0, "test": 1}
    assert loaded.report.to_dict()["skipped"] == {
        "empty_text": 1,
        "missing_field": 1,
        "wrong_type": 3,
    }


def test_pepler_index_errors_name_the_file(tmp_path):
    path = write_pepler(
        tmp_path, [pepler_row()] * 3, {"train": [0, 7], "validation": [1], "test": [2]}
    )
    with pytest.raises(ValueError, match=r"train\.index: position 7 is outside the 3 records"):
        load_records(config("pepler", path, index_dir=str(tmp_path / "1")))
    write_pepler(tmp_path, [pepler_row()] * 3, {"train": [0, 1], "validation": [1], "test": [2]})
    with pytest.raises(ValueError, match=r"validation\.index: shares record positions"):
        load_records(config("pepler", path, index_dir=str(tmp_path / "1")))


class _RunsCode:
    """Pickles to a call of ``exec`` that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_restricted_unpickler_refuses_a_function_call(tmp_path):
    marker = tmp_path / "code_ran"
    payload = pickle.dumps([{"user": "u", "template": _RunsCode(marker)}])
    # The payload really runs code under the standard unpickler...
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    # ...and is refused, before anything runs, by ours.
    (tmp_path / "reviews.pickle").write_bytes(payload)
    with pytest.raises(
        UnsafePickleError, match=r"reviews\.pickle: refused to load global 'builtins\.exec'"
    ):
        restricted_load(tmp_path / "reviews.pickle")
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match=r"refused to load global"):
        load_records(config("pepler", tmp_path / "reviews.pickle"))
    # A class is refused too (its constructor is code).
    with pytest.raises(UnsafePickleError, match=r"'pathlib\.\w*Path'"):
        restricted_loads(pickle.dumps(Path("x")))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_reads_builtin_containers(protocol):
    data = [{"a": (1, 2.5, "x", None, True), "b": {1, 2}, "c": frozenset({3}), "d": [1j]}]
    assert restricted_loads(pickle.dumps(data, protocol=protocol)) == data


def test_truncated_pickle_is_a_clear_error():
    with pytest.raises(pickle.UnpicklingError, match=r"<bytes>: not a readable pickle"):
        restricted_loads(pickle.dumps([1, 2, 3])[:-3])


# ---------------------------------------------------------------------------------------------
# The real Amazon Musical Instruments 5-core file.


def require_amazon_file() -> Path:
    if not AMAZON_FILE.is_file():
        pytest.skip(f"shared data file {AMAZON_FILE} is absent")
    return AMAZON_FILE


def test_amazon_musical_instruments_counts():
    path = require_amazon_file()
    loaded = load_records(config("amazon", path, on_bad_row="skip"))
    report = loaded.report.to_dict()
    assert report["rows_read"] == 10_261
    assert report["skipped"] == {"empty_text": 7}
    assert len(loaded.records) == 10_261 - 7
    assert len({r.user for r in loaded.records}) == 1_429
    assert len({r.item for r in loaded.records}) == 900
    # Field by field against a plain json reading of the file.
    with gzip.open(path) as file:
        rows = [json.loads(line) for line in file]
    assert loaded.records == [
        Review(
            r["reviewerID"],
            r["asin"],
            r["overall"],
            r["reviewText"],
            timestamp=r["unixReviewTime"],
            summary=r["summary"],
        )
        for r in rows
        if r["reviewText"].strip()
    ]
    # By default the first empty text stops loading, naming its line.
    with pytest.raises(BadRowError, match=rf"{path}:2928: empty text: field 'reviewText'"):
        load_records(config("amazon", path))


def test_restricted_unpickler_allocates_nothing_larger_than_the_file():
    """``bytearray(2**30)`` as a 28-byte pickle: refused before it allocates (it would be 1 GiB)."""
    payload = b"cbuiltins\nbytearray\nJ\x00\x00\x00@\x85R."  # GLOBAL, BININT 2**30, TUPLE1, REDUCE
    assert len(payload) == 28
    with pytest.raises(UnsafePickleError, match=r"refused to load global 'builtins\.bytearray'"):
        restricted_loads(payload)
    # Protocol 5 writes a bytearray with an opcode, from bytes that are in the file: allowed.
    assert restricted_loads(pickle.dumps([bytearray(b"abc")], protocol=5)) == [bytearray(b"abc")]


# ---------------------------------------------------------------------------------------------
# Damaged files: an error naming the file (and the last complete line), never a bare EOFError.


@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
@pytest.mark.parametrize("source", ["amazon", "csv"])
def test_truncated_gzip_names_the_file_and_its_last_complete_line(tmp_path, source, on_bad_row):
    if source == "amazon":
        raw = b"".join(json.dumps(amazon_2014(user=f"A{i}")).encode() + b"\n" for i in range(200))
    else:
        raw = b"user,item,text\n" + b"".join(f"u{i},i{i},text {i}\n".encode() for i in range(2000))
    compressed = gzip.compress(raw)
    path = tmp_path / f"reviews.{source}.gz"
    path.write_bytes(compressed[: len(compressed) * 2 // 3])
    cfg = config(source, path, on_bad_row=on_bad_row)
    if source == "csv":
        cfg.columns.update(user="user", item="item", text="text", rating="")
    with pytest.raises(DataFileError) as raised:
        load_records(cfg)
    message = str(raised.value)
    match = re.match(
        rf"{re.escape(str(path))}: the compressed file is truncated or damaged after line (\d+),",
        message,
    )
    assert match, message
    # The named line is complete: it and every line before it decompress from the truncated file.
    last = int(match.group(1))
    readable = gzip.decompress(compressed)[: len(raw)].splitlines(keepends=True)[:last]
    with gzip.open(path) as file:
        head = [file.readline() for _ in range(last)]
    assert head == readable and head[-1].endswith(b"\n") and last > 1


def test_a_directory_as_data_path_says_so(tmp_path):
    with pytest.raises(
        DataFileError, match=rf"data file {re.escape(str(tmp_path))} is a directory \(data\.path\)"
    ):
        load_records(config("amazon", tmp_path))
    with pytest.raises(DataFileError, match="is a directory"):
        load_records(config("pepler", tmp_path))
