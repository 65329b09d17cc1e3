"""The frozen base: weights a run never changes, which checkpoints leave out and record by hash.

A part's *base* is its own group's parameters (``decoder`` or ``encoder``, not the ``lora``
adapters or the ``conditioning`` sublayers inside it) when that group trains in no stage (not
in ``train.trainable``, nor in ``train.stage1_trainable`` of a two-stage run): the demo's MiniLM
encoder, or the decoder under LoRA. The base holds its initial values at every step, so a
checkpoint leaves it out and records instead, in ``meta["frozen_from_init"]``, where it comes
from and the sha256 of its values (float32, before any ``train.frozen_dtype`` cast):

* ``init.<part>`` (a Hugging Face folder, ``minilm`` or ``run:WORKDIR``), when that source
  supplies every base leaf with the values the run starts from: ``{"init", "folder", "sha256"}``;
* the run's seeded initialisation, when ``init.<part>`` is empty: ``{"init": "", "folder": "",
  "seed", "num_users", "num_items", "rating_mean", "sha256"}``, enough to rebuild it.

Restoring rebuilds the base from its source and refuses one whose hash differs, naming both
sources and both hashes. The optimizer keeps no state for frozen groups (their
``optax.set_to_zero`` transform has none) and the train step takes no gradients of them.

``train.frozen_dtype="bfloat16"`` keeps the base in bfloat16 (:func:`cast_base`); the
adapters, the conditioning and the optimizer state stay float32.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from research import assets
from research.errors import ExpectedError
from research.models.build import build_generator, pretrained_part
from research.models.generator import param_group

META_KEY = "frozen_from_init"
PARTS = ("decoder", "encoder")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class FrozenSourceChanged(ExpectedError):
    """A base's source differs from the one a checkpoint left out; names both."""


def _folder(name: str) -> str:
    return str(assets.minilm_folder()) if name == "minilm" else name


def init_key(seed: int) -> jax.Array:
    """The key a run of ``seed`` initialises its parameters with (the other half: dropout)."""
    return jax.random.split(jax.random.key(seed))[0]


def fingerprint(tree: dict[str, Any]) -> str:
    """sha256 of a tree's leaf paths, dtypes, shapes and bytes (in sorted path order)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(tree, sep="/").items()):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{path}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def frozen_groups(cfg: ml_collections.ConfigDict) -> set[str]:
    """The parts whose own group trains in no stage."""
    trainable = set(cfg.train.trainable)
    if cfg.train.two_stage:
        trainable |= set(cfg.train.stage1_trainable)
    return set(PARTS) - trainable


def _is_base(path: tuple[str, ...], groups: set[str]) -> bool:
    return param_group(path) in groups


def base_of(params: dict[str, Any], part: str) -> dict[str, Any]:
    """The base leaves of ``params[part]`` (a tree relative to the part)."""
    flat = traverse_util.flatten_dict(params[part])
    return traverse_util.unflatten_dict(
        {p: v for p, v in flat.items() if _is_base((part, *p), {part})}
    )


def cast_base(cfg: ml_collections.ConfigDict, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (arrays or ``jax.ShapeDtypeStruct``) with the frozen base in
    ``train.frozen_dtype``; everything else as it is."""
    dtype = DTYPES[cfg.train.get("frozen_dtype", "float32")]
    groups = frozen_groups(cfg)

    def cast(path, leaf):
        keys = tuple(k.key for k in path)
        if not _is_base(keys, groups) or leaf.dtype == dtype:
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, dtype)
        return jnp.asarray(leaf, dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def load_source(folder: str, part: str) -> dict[str, Any]:
    """The part's parameters as the model holds them after loading ``folder`` (float32); a
    ``run:WORKDIR`` source gives that run's part (``research/runs.py``)."""
    tree = pretrained_part(folder, part)
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def _restricted(source: dict[str, Any], like: dict[str, Any]) -> dict[str, Any] | None:
    """``source``'s leaves at the paths of ``like``; None when it lacks one."""
    flat = traverse_util.flatten_dict(source)
    paths = traverse_util.flatten_dict(like)
    if not paths.keys() <= flat.keys():
        return None
    return traverse_util.unflatten_dict({p: flat[p] for p in paths})


def frozen_parts(
    cfg: ml_collections.ConfigDict, params: dict[str, Any], sizes: dict[str, Any]
) -> dict[str, dict]:
    """``{part: record}`` of the bases a checkpoint leaves out (see the module docstring).

    ``params`` are the run's initial (float32) parameters; ``sizes`` the dataset's
    ``num_users``, ``num_items`` and ``rating_mean`` they were built with.
    """
    out = {}
    for part in sorted(frozen_groups(cfg)):
        if part not in params:
            continue
        base = base_of(params, part)
        if not base:
            continue
        digest, name = fingerprint(base), cfg.init[part]
        if not name:
            out[part] = {"init": "", "folder": "", "seed": cfg.seed, **sizes, "sha256": digest}
            continue
        source = _restricted(load_source(name, part), base)
        if source is not None and fingerprint(source) == digest:
            out[part] = {"init": name, "folder": _folder(name), "sha256": digest}
    return out


def without(params: dict[str, Any], parts: dict[str, Any]) -> dict[str, Any]:
    """``params`` less the base of each of ``parts`` (a part left empty is dropped)."""
    flat = traverse_util.flatten_dict(params)
    kept = {p: v for p, v in flat.items() if not _is_base(p, set(parts))}
    return traverse_util.unflatten_dict(kept) if kept else {}


def with_base(params: dict[str, Any], bases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``params`` with each ``bases[part]`` tree put back into ``params[part]``."""
    flat = traverse_util.flatten_dict(params)
    for part, tree in bases.items():
        flat |= {(part, *p): v for p, v in traverse_util.flatten_dict(tree).items()}
    return traverse_util.unflatten_dict(flat)


def _described(record: dict[str, Any], part: str) -> str:
    where = f"init.{part}={record['init']!r}" if record["init"] else f"seed={record['seed']}"
    return f"{where}, sha256 {record['sha256'][:12]}"


def check_unchanged(saved: dict[str, dict], current: dict[str, dict], where: str) -> None:
    """Raise unless every base ``saved`` left out has, now, the same hash."""
    for part, record in saved.items():
        now = current.get(part)
        if now is not None and now["sha256"] == record["sha256"]:
            continue
        source = record["folder"] or "the seeded initialisation"
        found = "not supplied whole by it" if now is None else _described(now, part)
        raise FrozenSourceChanged(
            f"{source}: {where} left out the {part} base it trained on "
            f"({_described(record, part)}), but that base is now {found}; the checkpoint "
            f"cannot be completed from a different {part}: restore the original weights"
        )


def _rebuilt(cfg: ml_collections.ConfigDict, record: dict[str, Any], part: str) -> dict:
    """The base of ``part`` from the source ``record`` names (float32)."""
    if record["init"]:
        tree = load_source(record["init"], part)
    else:
        sizes = (record["num_users"], record["num_items"])
        _, params = build_generator(cfg, *sizes, init_key(record["seed"]), record["rating_mean"])
        tree = jax.tree.map(np.asarray, params[part])
    return base_of({part: tree}, part)


def load_into(
    cfg: ml_collections.ConfigDict, params: dict[str, Any], saved: dict[str, dict], where: str
) -> dict[str, Any]:
    """``params`` (as restored) with the bases ``saved`` left out rebuilt from their sources,
    checked against their hashes, in ``train.frozen_dtype``."""
    bases = {}
    for part, record in saved.items():
        bases[part] = _rebuilt(cfg, record, part)
        now = {**record, "sha256": fingerprint(bases[part])}
        check_unchanged({part: record}, {part: now}, where)
    return cast_base(cfg, with_base(params, bases))
