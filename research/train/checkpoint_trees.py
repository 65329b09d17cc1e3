"""What a checkpoint's trees must be: arrays to save, shapes and dtypes to restore against, JSON
meta. Orbax itself would fail late (inside its save threads) or silently (casting dtypes,
padding or truncating shapes), so :mod:`research.train.checkpoint` checks here first."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from research.errors import ExpectedError


class CheckpointMismatch(ExpectedError, ValueError):
    """The saved tree differs from the target in keys, shapes or dtypes (a config change)."""


def host_array(path: tuple, leaf: Any) -> np.ndarray:
    """``leaf`` as a numpy array (may be a view: Orbax copies host arrays before writing them)."""
    name = jax.tree_util.keystr(path)
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        raise TypeError(f"state{name} is a typed PRNG key; store jax.random.key_data(key) instead")
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise ValueError(
            f"state{name} spans several processes; pass this process's replica of it "
            "(e.g. x.addressable_data(0)); sharded state is not supported"
        )
    if not isinstance(leaf, np.ndarray | np.generic | jax.Array):
        raise TypeError(f"state{name} is a {type(leaf).__name__}; state leaves must be arrays")
    if np.size(leaf) == 0:
        # Orbax refuses these mid-save, which leaves its background threads waiting minutes.
        raise ValueError(f"state{name} has no elements; Orbax cannot save empty arrays")
    return np.asarray(leaf)


def abstract_leaf(path: tuple, leaf: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype of a target leaf, without sharding (so Orbax restores numpy arrays)."""
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        name = jax.tree_util.keystr(path)
        raise TypeError(f"target{name} is a {type(leaf).__name__}; leaves need .shape and .dtype")
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)


def check_json(value: Any, where: str) -> None:
    """Raise if ``value`` would not come back unchanged from JSON (tuples, NaN, numpy scalars)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string (JSON keys are strings)")
            check_json(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json(item, f"{where}[{index}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; JSON has no NaN or infinity")
    elif not (value is None or isinstance(value, str | int | bool)):
        hint = " (tuples come back as lists)" if isinstance(value, tuple) else ""
        raise TypeError(f"{where} is a {type(value).__name__}, not a JSON value{hint}")


def flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """``{key path: (shape, dtype)}`` of a tree of arrays or Orbax array metadata."""
    flat = ocp.tree.to_flat_dict(tree)
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat.items()}


def check_same(saved: dict, wanted: dict, step_dir: Path) -> None:
    """Raise :class:`CheckpointMismatch` naming the first key whose shape or dtype differs."""
    where = f"checkpoint {step_dir}"
    missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    if missing or extra:
        raise CheckpointMismatch(
            f"{where}: state keys differ from the target; "
            f"missing in checkpoint: {['.'.join(k) for k in missing]}, "
            f"not in target: {['.'.join(k) for k in extra]}"
        )
    for path, (shape, dtype) in wanted.items():
        if saved[path] != (shape, dtype):
            raise CheckpointMismatch(
                f"{where}: state.{'.'.join(path)} is saved as {saved[path][1]}{list(saved[path][0])}"
                f" but the target is {dtype}{list(shape)}"
            )
