"""Frozen-encoder features: run a frozen encoder once per example, then read what it computed.

Every shipped config freezes the encoder, and running it again over the same histories at every
step was most of a conditioned step. When the encoder does not train (in the current stage),
:func:`prepare` computes what the conditioning methods read for every split, once, and
:meth:`FeatureCache.attach` puts it into batches as ``encoder_states``/``encoder_mask``, which
``Generator.encode`` reads instead of running the encoder (train, eval and sampling steps alike).

What is stored, per split, on disk and memory-mapped, in ``cache.features_dtype``:

* ``states``: every real token's final encoder state, ``[tokens, E]``, packed like the split's
  ``encoder`` ragged ids (row ``r`` is ``offsets[r]:offsets[r+1]``) when a method reads all
  states (``cross_attention``);
* ``pooled``: one vector per example, ``[examples, E]``, when only pooled methods are used
  (``prefix``, ``additive``). A batch then carries it as a one-token sequence with mask 1, whose
  mean and whose first state are the vector itself, so the methods need no second code path.

The folder is named by a digest of everything the features depend on: the encoder's
architecture and weights, the compute and storage dtypes, what is stored (and the pooling), and
every split's encoder token ids, which fix the tokenizer, the encoder-input settings
(``data.encoder_input``, ``data.max_encoder_tokens``, ...) and the data. Any change gives another
folder, so a stale cache is never read. A cache is written into a temporary folder and renamed
once complete (a process killed while writing leaves only the temporary folder, removed by the
next build); a folder whose manifest or file sizes do not match is built again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from research.compilation_cache import OFF, user_cache_dir
from research.data.arrays import TokenizedSplit
from research.data.batching import bucket_length
from research.data.pipeline import Dataset
from research.models.conditioning import pool
from research.models.generator import Generator, part_trains

# Bump when the stored arrays would change for the same key (a change in how they are made).
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}
# Methods that read only the pooled encoder vector.
POOLED_METHODS = frozenset({"prefix", "additive"})


def wanted(cfg: ml_collections.ConfigDict, model: Generator, trainable: tuple[str, ...]) -> bool:
    """Whether runs with ``trainable`` groups read cached features instead of the encoder."""
    frozen = not part_trains(model.spec, "encoder", trainable)
    return model.spec.uses_encoder and frozen and cfg.cache.features_dir != OFF


@dataclasses.dataclass
class FeatureCache:
    """Memory-mapped features of every split (see module docstring); ``built``: made just now."""

    folder: Path
    kind: str  # "states" or "pooled"
    arrays: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]  # per split: the encoder ids' row offsets (int64 [rows + 1])
    built: bool = False

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def report(self) -> dict[str, Any]:
        """What the data report says about the cache."""
        dtype = next(iter(self.arrays.values())).dtype
        return {
            "folder": str(self.folder),
            "kind": self.kind,
            "dtype": str(dtype),
            "bytes": self.nbytes,
        }

    def attach(self, batch: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
        """``batch`` (with ``example``) with ``encoder_states`` in place of ``encoder_ids``.

        ``states``: ``[batch, S, E]`` for the batch's encoder length S (its ``encoder_mask``
        kept); ``pooled``: ``[batch, 1, E]`` with ``encoder_mask`` ones ``[batch, 1]``. Padding
        rows (example -1) get zeros.
        """
        rows = np.asarray(batch["example"])
        real = rows >= 0
        safe = np.where(real, rows, 0)
        values = self.arrays[split]
        out = {k: v for k, v in batch.items() if k != "encoder_ids"}
        if self.kind == "pooled":
            states = np.where(real[:, None], values[safe], 0).astype(values.dtype)
            out["encoder_states"] = states[:, None, :]
            out["encoder_mask"] = np.ones((len(rows), 1), np.int32)
            return out
        mask = np.asarray(batch["encoder_mask"]).astype(bool)
        index = self.offsets[split][safe][:, None] + np.arange(mask.shape[1])
        index = np.where(mask, index, 0)
        out["encoder_states"] = np.where(mask[..., None], values[index], 0).astype(values.dtype)
        return out


def _digest(cfg, model: Generator, encoder_params: Any, dataset: Dataset, kind: str) -> str:
    h = hashlib.sha256()
    settings = {
        "version": VERSION,
        "encoder": dataclasses.asdict(model.spec.encoder),
        "compute_dtype": str(np.dtype(model.dtype)),
        "store_dtype": cfg.cache.features_dtype,
        "kind": kind,
        "pooling": model.spec.option("pooling") if kind == "pooled" else None,
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path, leaf in sorted(
        jax.tree_util.tree_leaves_with_path(encoder_params), key=lambda p: str(p[0])
    ):
        leaf = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    for name in sorted(dataset.splits):
        ids = dataset.splits[name].encoder
        h.update(name.encode())
        h.update(np.ascontiguousarray(ids.values).tobytes())
        h.update(np.ascontiguousarray(ids.offsets).tobytes())
    return h.hexdigest()


def _expected_shapes(dataset: Dataset, kind: str, width: int) -> dict[str, tuple[int, int]]:
    if kind == "pooled":
        return {name: (len(split), width) for name, split in dataset.splits.items()}
    return {name: (int(split.encoder.offsets[-1]), width) for name, split in dataset.splits.items()}


def _open(folder: Path, key: str, shapes: dict, dtype: np.dtype) -> dict[str, np.ndarray] | None:
    """The folder's memory-mapped arrays, or None unless it is complete and made for ``key``."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key or manifest.get("splits") != {
        name: list(shape) for name, shape in shapes.items()
    }:
        return None
    arrays = {}
    for name, shape in shapes.items():
        path = folder / f"{name}.bin"
        expected = int(np.prod(shape)) * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            return None  # truncated or replaced
        arrays[name] = (
            np.memmap(path, dtype=dtype, mode="r", shape=shape)
            if expected
            else np.zeros(shape, dtype)
        )
    return arrays


def _temporary_name(name: str, pid: int) -> str:
    return f".{name}.tmp-{socket.gethostname()}-{pid}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale_temporaries(root: Path, name: str) -> None:
    """Temporary folders of ``name`` left on this host by processes killed while writing."""
    for tmp in root.glob(_temporary_name(name, 0)[:-1] + "*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _running(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def encode_function(model: Generator, kind: str):
    def encode(params, ids, mask):
        states, mask = model.apply(
            {"params": params},
            {"encoder_ids": ids, "encoder_mask": mask},
            deterministic=True,
            method=Generator.encode,
        )
        return pool(states, mask, model.spec.option("pooling")) if kind == "pooled" else states

    return jax.jit(encode)


def _write_split(
    out: np.ndarray,
    encode,
    params: Any,
    split: TokenizedSplit,
    buckets: tuple[int, ...],
    batch_size: int,
) -> None:
    """Encode ``split`` in order, ``batch_size`` examples at a time, into ``out``."""
    ids_of = split.encoder
    starts = range(0, len(split), batch_size)
    for start in tqdm(starts, desc=f"encode {split.name}", unit="batch", leave=False):
        rows = np.arange(start, start + batch_size)
        rows[rows >= len(split)] = -1
        real = rows >= 0
        length = bucket_length(int(ids_of.lengths_of(rows[real]).max(initial=1)), buckets)
        ids, mask = ids_of.padded(rows, length, split.encoder_pad)
        result = np.asarray(encode(params, ids, mask)).astype(out.dtype)
        if out.shape[0] == len(split):  # pooled: one row per example
            out[start : start + int(real.sum())] = result[real]
        else:  # states: the real tokens, packed in row order
            begin, end = ids_of.offsets[start], ids_of.offsets[start + int(real.sum())]
            out[begin:end] = result[mask.astype(bool)]


def prepare(
    cfg: ml_collections.ConfigDict, dataset: Dataset, model: Generator, params: dict[str, Any]
) -> FeatureCache:
    """The features of ``params``' encoder for every split of ``dataset``, built if needed."""
    kind = "pooled" if set(model.spec.conditioning) <= POOLED_METHODS else "states"
    dtype = DTYPES[cfg.cache.features_dtype]
    key = _digest(cfg, model, params["encoder"], dataset, kind)
    root = Path(cfg.cache.features_dir or user_cache_dir() / "encoder_features")
    folder = root / f"{kind}-{key[:32]}"
    shapes = _expected_shapes(dataset, kind, model.spec.encoder.hidden_size)
    offsets = {name: split.encoder.offsets for name, split in dataset.splits.items()}
    arrays = _open(folder, key, shapes, dtype)
    if arrays is not None:
        return FeatureCache(folder, kind, arrays, offsets)

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root, folder.name)
    tmp = root / _temporary_name(folder.name, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    encode = encode_function(model, kind)
    for name, shape in shapes.items():
        path = tmp / f"{name}.bin"
        if not np.prod(shape):
            path.touch()  # an empty split: nothing to map
            continue
        data = np.memmap(path, dtype=dtype, mode="w+", shape=shape)
        _write_split(
            data,
            encode,
            params,
            dataset.splits[name],
            dataset.encoder_buckets,
            cfg.train.eval_batch_size,
        )
        data.flush()
        del data
    manifest = {"key": key, "kind": kind, "dtype": cfg.cache.features_dtype}
    manifest["splits"] = {name: list(shape) for name, shape in shapes.items()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if folder.exists():  # incomplete or damaged: it did not open above
        shutil.rmtree(folder)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)
    arrays = _open(folder, key, shapes, dtype)
    if arrays is None:
        raise RuntimeError(f"encoder feature cache {folder} could not be read back after writing")
    return FeatureCache(folder, kind, arrays, offsets, built=True)
