"""Parts of the model that a run never changes and that come whole from an init folder.

Today that is the demo's MiniLM encoder: ``init.encoder`` names the folder, and ``encoder`` is
trainable in no stage (not in ``train.trainable``, nor in ``train.stage1_trainable`` of a
two-stage run). Such a part holds the folder's weights at every step, so a checkpoint leaves
it out and records instead, in ``meta["frozen_from_init"]``, where it comes from and the
sha256 of its values. Restoring loads the part from the folder again and refuses a folder
whose weights changed, naming it. (The optimizer keeps no state for frozen groups either:
their ``optax.set_to_zero`` transform has none.)

A part is left out only when the folder supplies every one of its leaves: a decoder with
cross-attention sublayers the folder lacks stays in the checkpoints.
"""

from __future__ import annotations

import hashlib
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from research import assets
from research.errors import ExpectedError
from research.models.build import pretrained_part

META_KEY = "frozen_from_init"
PARTS = ("decoder", "encoder")


class FrozenSourceChanged(ExpectedError):
    """An init folder's weights differ from those a checkpoint left out; names the folder."""


def _folder(name: str) -> str:
    return str(assets.minilm_folder()) if name == "minilm" else name


def fingerprint(tree: dict[str, Any]) -> str:
    """sha256 of a tree's leaf paths, dtypes, shapes and bytes (in sorted path order)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(tree, sep="/").items()):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{path}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def load_source(folder: str, part: str) -> dict[str, Any]:
    """The part's parameters as the model holds them after loading ``folder`` (float32); a
    ``run:WORKDIR`` source gives that run's part (``research/runs.py``)."""
    tree = pretrained_part(folder, part)
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def frozen_parts(cfg: ml_collections.ConfigDict, params: dict[str, Any]) -> dict[str, dict]:
    """``{part: {"init": name, "folder": path, "sha256": hash}}`` of the parts left out.

    ``params`` are the run's initial parameters; a part qualifies when it trains in no stage
    and ``cfg.init.<part>`` supplies all of it (its fingerprint equals the folder's).
    """
    trainable = set(cfg.train.trainable)
    if cfg.train.two_stage:
        trainable |= set(cfg.train.stage1_trainable)
    out = {}
    for part in PARTS:
        name = cfg.init[part]
        if not name or part not in params or part in trainable:
            continue
        digest = fingerprint(load_source(name, part))
        if digest == fingerprint(params[part]):
            out[part] = {"init": name, "folder": _folder(name), "sha256": digest}
    return out


def without(params: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    """``params`` less the top-level ``parts``."""
    return {key: value for key, value in params.items() if key not in parts}


def check_unchanged(saved: dict[str, dict], current: dict[str, dict], where: str) -> None:
    """Raise unless every part ``saved`` left out comes, unchanged, from the same folder now."""
    for part, record in saved.items():
        now = current.get(part)
        if now is None or now["sha256"] != record["sha256"]:
            found = (
                "no longer supplies it whole" if now is None else f"now hashes {now['sha256'][:12]}"
            )
            raise FrozenSourceChanged(
                f"{record['folder']}: {where} left out the {part} (init.{part}={record['init']!r}, "
                f"sha256 {record['sha256'][:12]}), but this folder {found}; the checkpoint "
                "cannot be completed: put the original weights back in that folder"
            )


def load_into(params: dict[str, Any], saved: dict[str, dict], where: str) -> dict[str, Any]:
    """``params`` (as restored) with the parts ``saved`` left out loaded from their folders."""
    out = dict(params)
    for part, record in saved.items():
        tree = load_source(record["init"], part)
        check_unchanged({part: record}, {part: {**record, "sha256": fingerprint(tree)}}, where)
        out[part] = tree
    return out
