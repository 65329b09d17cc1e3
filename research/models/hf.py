"""Hugging Face checkpoints <-> our Flax parameter trees.

``load_pretrained(folder)`` reads ``config.json`` and the weights of a local Hugging Face model
folder (``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
``pytorch_model.bin`` when torch is installed) and returns ``(model, params)``.
``save_pretrained(folder, model, params)`` writes a folder that transformers' PyTorch
``from_pretrained`` loads. Nothing is ever downloaded.

Each family's conversion is one table in its own module (``GPT2_TABLE`` in ``gpt2.py``,
``BERT_TABLE`` in ``bert.py``, ...): one line per tensor, ``{i}`` standing for the layer index,
the third column saying how the tensor's layout changes (``research/models/families.py``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from research.files import atomic_write
from research.models import families
from research.models.families import KEEP, TRANSPOSE, HFConversion

_TO_FLAX: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    KEEP: lambda a: a,
    TRANSPOSE: np.transpose,
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read into our parameters; the message says why."""


def expand_table(arch: HFConversion, config: Any) -> list[tuple[str, str, str]]:
    """The table with ``{i}`` replaced by every layer index: (hf name, flax path, layout)."""
    rows = []
    table = arch.table(config) if callable(arch.table) else arch.table
    for hf, fx, layout in table:
        if "{i}" in hf:
            rows += [
                (hf.format(i=i), fx.format(i=i), layout) for i in range(arch.num_layers(config))
            ]
        else:
            rows.append((hf, fx, layout))
    return rows


def read_config(folder: str | Path) -> tuple[Any, Any]:
    """Validate ``folder/config.json`` and return its model family and our config object."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model folder needs config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    try:
        family = families.family(raw.get("model_type"), source=f"{path}: model_type")
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    try:
        return family, family.config_cls.from_dict(raw, source=str(path))
    except (ValueError, TypeError) as err:
        raise CheckpointError(str(err)) from err


def read_state_dict(folder: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a model folder as float32 numpy arrays, by their Hugging Face names."""
    folder = Path(folder)
    single, index, torch_bin = (
        folder / "model.safetensors",
        folder / "model.safetensors.index.json",
        folder / "pytorch_model.bin",
    )
    if single.exists():
        tensors = _read_safetensors(single)
    elif index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(folder / shard))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index} lists tensors no shard holds: {missing[:5]}")
    elif torch_bin.exists():
        tensors = _read_torch_bin(torch_bin)
    else:
        raise FileNotFoundError(
            f"{folder} holds no weights: expected model.safetensors, "
            "model.safetensors.index.json (sharded) or pytorch_model.bin"
        )
    return {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.exists():
        raise FileNotFoundError(f"safetensors shard {path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({err})") from err
    except TypeError:  # bfloat16 has no numpy dtype: fall back to torch if present
        return _read_with_torch(path)


def _read_with_torch(path: Path) -> dict[str, np.ndarray]:
    _import_torch(path)
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def _import_torch(path: Path):
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"{path} needs PyTorch to read; install it with: pip install torch==2.13.0 "
            "(or convert the folder to model.safetensors)"
        ) from err
    return torch


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    torch = _import_torch(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise CheckpointError(f"{path}: cannot read PyTorch weights ({err})") from err
    return {k: v.float().numpy() for k, v in state.items()}


def _normalise_names(arch: HFConversion, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        for prefix in arch.strip_prefixes:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        # Pre-2019 checkpoints call LayerNorm parameters gamma/beta.
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        out[name] = value
    return out


def convert_to_flax(
    arch: HFConversion,
    config: Any,
    tensors: dict[str, np.ndarray],
    expected: dict[str, Any],
    source: str,
    strict: bool = False,
) -> dict[str, Any]:
    """Hugging Face tensors -> nested Flax params, checking names and shapes.

    ``expected`` maps flax paths ("h_0/attn/c_attn/kernel") to objects with ``.shape``.
    Missing tensors, shape mismatches and tensors of layers the config lacks (a
    ``config.json`` that lies about the depth) raise; other unexpected tensors (a task head)
    are reported by a warning (an error when ``strict``).
    """
    tensors = _normalise_names(arch, tensors)
    flat, missing, mismatched = {}, [], []
    used = set()
    for hf_name, flax_path, layout in expand_table(arch, config):
        if hf_name not in tensors:
            missing.append(hf_name)
            continue
        value = _TO_FLAX[layout](tensors[hf_name])
        used.add(hf_name)
        want = tuple(expected[flax_path].shape)
        if value.shape != want:
            mismatched.append(
                f"{hf_name} has shape {value.shape}, but parameter {flax_path} needs {want}"
            )
        flat[flax_path] = np.ascontiguousarray(value, dtype=np.float32)
    if missing or mismatched:
        lines = [f"missing tensor {name}" for name in missing] + mismatched
        raise CheckpointError(f"{source}: cannot load weights: " + "; ".join(lines))
    extra = sorted(
        name
        for name in set(tensors) - used
        if not re.fullmatch(arch.buffers, name) and not _is_tied(arch, name, tensors)
    )
    layers = _layer_tensors(arch, config, extra)
    if layers:
        raise CheckpointError(
            f"{source}: {len(layers)} tensors of layers config.json does not have "
            f"({arch.num_layers(config)} layers): {layers[:5]}"
        )
    if extra:
        message = f"{source}: {len(extra)} unexpected tensors not loaded: {extra[:10]}"
        if strict:
            raise CheckpointError(message)
        warnings.warn(message, stacklevel=3)
    return traverse_util.unflatten_dict(flat, sep="/")


def _layer_tensors(arch: HFConversion, config: Any, names: list[str]) -> list[str]:
    """The names that are per-layer rows of the table (``h.{i}.*``), of some layer index (the
    table's own layers are used, so these are layers past the config's)."""
    table = arch.table(config) if callable(arch.table) else arch.table
    patterns = [
        re.compile(re.escape(hf).replace(re.escape("{i}"), r"\d+"))
        for hf, _, _ in table
        if "{i}" in hf
    ]
    return [name for name in names if any(p.fullmatch(name) for p in patterns)]


def _is_tied(arch: HFConversion, name: str, tensors: dict[str, np.ndarray]) -> bool:
    """A tensor tied to another (an LM head to the token embeddings): a copy is no news."""
    return any(
        name == copy and source in tensors and np.array_equal(tensors[name], tensors[source])
        for copy, source in arch.tied
    )


def abstract_params(module: Any, config: Any) -> dict[str, Any]:
    """Flat ``{path: ShapeDtypeStruct}`` of a module's parameters, without allocating them."""
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"]
    return traverse_util.flatten_dict(shapes, sep="/")


def load_pretrained(
    folder: str | Path, dtype: Any = jnp.float32, strict: bool = False
) -> tuple[Any, dict[str, Any]]:
    """Load a local Hugging Face folder of a registered family -> ``(model, params)``.

    ``dtype`` is the compute dtype; parameters are float32. A decoder family returns its LM
    (GPT-2: :class:`GPT2LMHead`, ``apply`` gives logits ``[batch, seq, vocab]``); an encoder
    family its encoder (BERT: ``apply`` gives ``(last_hidden_state, pooler_output)``).
    """
    family, config = read_config(folder)
    model = family.module_cls(config, dtype=dtype)
    tensors = read_state_dict(folder)
    params = convert_to_flax(
        family.hf, config, tensors, abstract_params(model, config), str(folder), strict
    )
    return model, jax.tree_util.tree_map(jnp.asarray, params)


def save_pretrained(folder: str | Path, model: Any, params: dict[str, Any]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers' ``from_pretrained`` reads.

    Files are written to temporary names and renamed, so a crash never leaves half a file.
    """
    from safetensors.numpy import save_file

    arch = families.family(model.config.model_type).hf
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    rows = expand_table(arch, model.config)
    unknown = sorted(set(flat) - {fx for _, fx, _ in rows})
    if unknown:
        raise CheckpointError(
            f"parameters with no Hugging Face {model.config.model_type} equivalent: {unknown[:5]}"
        )
    tensors = {}
    for hf_name, flax_path, layout in rows:
        # Both layout changes are their own inverse.
        tensors[arch.save_prefix + hf_name] = np.ascontiguousarray(
            _TO_FLAX[layout](np.asarray(flat[flax_path], np.float32))
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.dumps(model.config.to_hf_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, p))
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(config))
    return folder
