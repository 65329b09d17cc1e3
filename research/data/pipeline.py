"""Data config to tokenized splits, index maps, a data report and batch iterators.

``load_dataset(cfg)`` reads the records, splits them, maps users/items to dense indices from the
TRAIN split (0 = not seen in training), builds targets and encoder inputs, tokenizes them
(cached on disk under ``data.cache_dir``, keyed by data files + tokenizers + settings) and
returns a ``Dataset`` whose splits keep their records, so ``example`` indices in batches can be
turned back into user, item and reference text.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ml_collections
import numpy as np
from transformers import PreTrainedTokenizerBase

from research.data import tokenizers
from research.data.arrays import Ragged, TokenizedSplit
from research.data.batching import EvalIterator, TrainIterator
from research.data.config import SPLITS, effective_buckets, validate_data_config
from research.data.encoder_inputs import encoder_rows, training_histories
from research.data.loaders import LoadedData, load_records
from research.data.records import Review
from research.data.splits import seeded_split, seeded_subset
from research.files import atomic_write

# Bump when the cached arrays would change for the same key (a change in how they are built).
CACHE_VERSION = 1
REPORT_FILE = "data_report.json"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def first_sentence(text: str) -> str:
    """Text up to the first ., ! or ? followed by whitespace (all of it when there is none)."""
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def target_text(record: Review, target: str) -> str:
    """The decoder target of ``record`` for ``data.target``, before the token cut."""
    if target == "review":
        return record.text
    if target == "first_sentence":
        return first_sentence(record.text)
    if target == "template":
        return record.sentence
    return record.summary


@dataclass
class Dataset:
    """Tokenized splits plus what is needed to read batches back.

    ``users[k]``/``items[k]`` is the raw id of dense index k (``users[0] == ""``: unseen);
    ``user_index``/``item_index`` map raw ids to dense indices (train users/items only).
    ``rating_range`` is the (lowest, highest) rating of the train split and ``rating_mean`` its
    mean, both None when it has none; predicted ratings are clamped to the range before scoring,
    as PETER/PEPLER do, and rating heads start from the mean.
    """

    config: ml_collections.ConfigDict
    splits: dict[str, TokenizedSplit]
    users: list[str]
    items: list[str]
    user_index: dict[str, int]
    item_index: dict[str, int]
    report: dict
    target_buckets: tuple[int, ...]
    encoder_buckets: tuple[int, ...]
    decoder_tokenizer: PreTrainedTokenizerBase
    rating_range: tuple[float, float] | None = None
    rating_mean: float | None = None

    @property
    def num_users(self) -> int:
        """User table size, including the reserved index 0."""
        return len(self.users)

    @property
    def num_items(self) -> int:
        """Item table size, including the reserved index 0."""
        return len(self.items)

    def train_iterator(
        self,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        split: str = "train",
    ) -> TrainIterator:
        """Infinite shuffled batches of ``split``; this process's slice of each global batch."""
        return TrainIterator(
            self.splits[split],
            global_batch_size,
            seed,
            self.target_buckets,
            self.encoder_buckets,
            process_index,
            process_count,
        )

    def eval_iterator(
        self,
        split: str,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
        examples: np.ndarray | None = None,
    ) -> EvalIterator:
        """One sequential pass over ``split`` (or its ``examples``), last batch padded."""
        return EvalIterator(
            self.splits[split],
            global_batch_size,
            self.target_buckets,
            self.encoder_buckets,
            process_index,
            process_count,
            examples,
        )

    def eval_subset(self, split: str, count: int, seed: int) -> np.ndarray | None:
        """``count`` examples of ``split`` drawn with ``seed`` (None: all of them).

        The draw depends only on the split and the seed (never on the model or the run's
        seed), so every method is scored on the same examples, spread over the whole split
        whatever order the file had.
        """
        return seeded_subset(len(self.splits[split]), count, seed)

    def reference_texts(self, split: str) -> list[str]:
        """Targets as the decoder sees them (cut to max_target_tokens), decoded, per example."""
        decoder = self.splits[split].decoder
        rows = [decoder[r][1:-1].tolist() for r in range(len(decoder))]
        return self.decoder_tokenizer.batch_decode(rows)


def subset_record(examples: np.ndarray | None) -> dict:
    """What a run writes down about the examples it was scored on."""
    if examples is None:
        return {"examples": "all"}
    return {"num_examples": len(examples), "examples": examples.tolist()}


def _dense_index(ids) -> tuple[list[str], dict[str, int]]:
    ordered = [""] + sorted(set(ids))
    return ordered, {raw: index for index, raw in enumerate(ordered) if index}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A digest of everything that decides the tokenizer's ids (vocab, merges, rules, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{specials}|{state}".encode()).hexdigest()


def cache_key(cfg, files: list[Path], tokenizers) -> str:
    """Digest of the data files, the tokenizers and every data setting but the cache folder."""
    settings = cfg.to_dict()
    settings.pop("cache_dir")
    parts = {
        "version": CACHE_VERSION,
        "settings": settings,
        "files": [_file_digest(path) for path in files],
        "tokenizers": [tokenizer_fingerprint(tok) for tok in tokenizers],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _tokenize(cfg, records, positions, targets, decoder_tok, encoder_tok) -> dict[str, np.ndarray]:
    """All splits' token arrays, flat: ``{split}/{decoder|encoder}_{values|offsets}``, ..."""
    everything = [p for split in SPLITS for p in positions[split]]
    all_targets = [t for split in SPLITS for t in targets[split]]
    target_ids = decoder_tok(all_targets, add_special_tokens=False, verbose=False)["input_ids"]
    bos, eos = decoder_tok.bos_token_id, decoder_tok.eos_token_id
    decoder = [[bos, *ids[: cfg.max_target_tokens], eos] for ids in target_ids]
    histories = training_histories(records, positions["train"])
    encoder = encoder_rows(
        cfg.encoder_input,
        records,
        everything,
        all_targets,
        histories,
        encoder_tok,
        cfg.max_encoder_tokens,
        clean=cfg.clean_encoder_text,
    )
    arrays, start = {}, 0
    for split in SPLITS:
        stop = start + len(positions[split])
        arrays[f"{split}/positions"] = np.asarray(positions[split], dtype=np.int64)
        arrays[f"{split}/target_token_counts"] = np.array(
            [len(ids) for ids in target_ids[start:stop]], dtype=np.int64
        )
        for name, rows in (("decoder", decoder), ("encoder", encoder)):
            if rows is not None:
                ragged = Ragged.from_rows(rows[start:stop])
                arrays[f"{split}/{name}_values"] = ragged.values
                arrays[f"{split}/{name}_offsets"] = ragged.offsets
        start = stop
    return arrays


def _cached_arrays(path: Path, positions: dict[str, list[int]]) -> dict[str, np.ndarray] | None:
    """The cache file's arrays if it exists and was built for exactly these split positions."""
    if not path.is_file():
        return None
    with np.load(path) as cached:
        arrays = dict(cached)
    for split in SPLITS:
        if not np.array_equal(arrays.get(f"{split}/positions"), positions[split]):
            return None
    return arrays


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as file:  # a file object: np.savez would append ".npz" to a name
            np.savez(file, **arrays)

    atomic_write(path, write)


def _split_positions(cfg, loaded: LoadedData) -> dict[str, list[int]]:
    if loaded.splits is not None:
        return loaded.splits
    return seeded_split(
        loaded.records,
        tuple(cfg.split_ratios),
        cfg.split_seed,
        cfg.keep_test_entities_in_train,
    )


def _report(cfg, loaded: LoadedData, splits: dict[str, TokenizedSplit], users, items) -> dict:
    return {
        "source": cfg.source,
        "files": [str(path) for path in loaded.files],
        "bad_rows": loaded.report.to_dict(),
        "dropped_index_entries": loaded.dropped_index_entries,
        "records_per_split": {name: len(split) for name, split in splits.items()},
        "num_users": len(users) - 1,
        "num_items": len(items) - 1,
        "unseen_in_train": {
            name: {"users": int((split.user == 0).sum()), "items": int((split.item == 0).sum())}
            for name, split in splits.items()
        },
    }


def load_dataset(
    data_cfg: ml_collections.ConfigDict,
    workdir: str | Path | None = None,
    decoder_tokenizer: PreTrainedTokenizerBase | None = None,
    encoder_tokenizer: PreTrainedTokenizerBase | None = None,
) -> Dataset:
    """Load, split and tokenize the data of ``data_cfg``; write the report into ``workdir``.

    Tokenizers default to the folders in ``data.decoder_tokenizer``/``data.encoder_tokenizer``
    (empty: GPT-2 BPE and all-MiniLM-L6-v2's).
    """
    validate_data_config(data_cfg)
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    loaded = load_records(cfg)
    if not loaded.records:
        raise ValueError(
            f"data.path={cfg.path!r}: no usable records; bad rows: {loaded.report.to_dict()}"
        )
    records = loaded.records
    positions = _split_positions(cfg, loaded)
    if not positions["train"]:
        raise ValueError("the train split is empty; check data.split_ratios or data.index_dir")
    users, user_index = _dense_index(records[p].user for p in positions["train"])
    items, item_index = _dense_index(records[p].item for p in positions["train"])
    targets = {
        split: [target_text(records[p], cfg.target) for p in positions[split]] for split in SPLITS
    }
    decoder_tok = decoder_tokenizer or tokenizers.decoder_tokenizer(cfg.decoder_tokenizer or None)
    encoder_tok = encoder_tokenizer or tokenizers.encoder_tokenizer(cfg.encoder_tokenizer or None)
    if decoder_tok.pad_token_id is None or encoder_tok.pad_token_id is None:
        raise ValueError(
            f"data.decoder_tokenizer/data.encoder_tokenizer: pad ids {decoder_tok.pad_token_id}/"
            f"{encoder_tok.pad_token_id}; both tokenizers need a pad token"
        )

    arrays = None
    if cfg.cache_dir:
        key = cache_key(cfg, loaded.files, (decoder_tok, encoder_tok))
        cache_path = Path(cfg.cache_dir) / f"tokens-{key[:32]}.npz"
        arrays = _cached_arrays(cache_path, positions)
    if arrays is None:
        arrays = _tokenize(cfg, records, positions, targets, decoder_tok, encoder_tok)
        if cfg.cache_dir:
            _save_arrays(cache_path, arrays)

    splits = {}
    for split in SPLITS:
        split_records = [records[p] for p in positions[split]]
        encoder = None
        if cfg.encoder_input != "none":
            encoder = Ragged(arrays[f"{split}/encoder_values"], arrays[f"{split}/encoder_offsets"])
        splits[split] = TokenizedSplit(
            name=split,
            records=split_records,
            user=np.array([user_index.get(r.user, 0) for r in split_records], dtype=np.int32),
            item=np.array([item_index.get(r.item, 0) for r in split_records], dtype=np.int32),
            target_texts=targets[split],
            target_token_counts=arrays[f"{split}/target_token_counts"],
            decoder=Ragged(arrays[f"{split}/decoder_values"], arrays[f"{split}/decoder_offsets"]),
            encoder=encoder,
            decoder_pad=decoder_tok.pad_token_id,
            encoder_pad=encoder_tok.pad_token_id,
            rating=np.array(
                [np.nan if r.rating is None else r.rating for r in split_records], np.float32
            ),
        )
    train_ratings = splits["train"].rating[np.isfinite(splits["train"].rating)]
    report = _report(cfg, loaded, splits, users, items)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        (Path(workdir) / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return Dataset(
        config=cfg,
        splits=splits,
        users=users,
        items=items,
        user_index=user_index,
        item_index=item_index,
        report=report,
        target_buckets=effective_buckets(cfg.target_buckets, cfg.max_target_tokens + 2),
        encoder_buckets=effective_buckets(cfg.encoder_buckets, cfg.max_encoder_tokens),
        decoder_tokenizer=decoder_tok,
        rating_range=(
            (float(train_ratings.min()), float(train_ratings.max())) if len(train_ratings) else None
        ),
        rating_mean=float(train_ratings.mean(dtype=np.float64)) if len(train_ratings) else None,
    )


def load_dataset_logged(
    data_cfg: ml_collections.ConfigDict, workdir: str | Path | None = None, verbose: bool = True
) -> Dataset:
    """:func:`load_dataset`, announced on stderr (stdout may be a generated review) with a
    line before and a line of counts and time after."""
    where = f" from {data_cfg.path}" if data_cfg.path else ""
    if verbose:
        print(f"loading data: {data_cfg.source}{where} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    dataset = load_dataset(data_cfg, workdir)
    if verbose:
        report = dataset.report
        splits = ", ".join(f"{k} {v:,}" for k, v in report["records_per_split"].items())
        skipped = sum(report["bad_rows"]["skipped"].values())
        print(
            f"loaded data in {time.perf_counter() - started:.1f} s: {splits} reviews, "
            f"{report['num_users']:,} users, {report['num_items']:,} items, "
            f"{skipped:,} bad rows skipped",
            file=sys.stderr,
            flush=True,
        )
    return dataset
