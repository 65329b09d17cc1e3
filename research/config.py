"""Experiment configs: loading a config file, command-line overrides, validation.

A config file (``experiments/configs/NAME.py``) defines ``get_config()`` that starts from
:func:`research.config_defaults.default_config` and changes what the experiment needs. The
command line then overrides single keys in the JAX convention, ``--config.train.steps=50``.
Everything is checked before any model is built or compiled: unknown keys (with a "did you
mean"), wrong types, invalid choices (listing the valid ones) and out-of-range numbers, always
naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections

from research.config_defaults import default_config
from research.data.config import DATA_CHOICES, validate_data_config
from research.models import conditioning
from research.models.build import scratch_family
from research.models.generator import GROUPS
from research.models.lora import LoRAConfig
from research.models.rating import HEADS
from research.runs import tokenizer_source
from research.sampling import SamplingConfig
from research.train.optim import SCHEDULES

DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("", "xla", "cudnn")


CHOICES: dict[str, tuple] = {
    "model.rating_head": tuple(HEADS),
    "model.dtype": DTYPES,
    "model.attention_impl": ATTENTION_IMPLS,
    "train.schedule": SCHEDULES,
    "eval.checkpoint": ("best", "latest"),
    "cache.features_dtype": DTYPES,
    "train.frozen_dtype": DTYPES,
    "eval.split": ("train", "validation", "test"),
}

POSITIVE = (
    "train.steps",
    "train.batch_size",
    "train.accum_steps",
    "train.learning_rate",
    "train.eval_every",
    "train.eval_batch_size",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "model.rating_hidden_size",
    "model.rating_layers",
)
NON_NEGATIVE = (
    "train.warmup_steps",
    "train.weight_decay",
    "train.clip_norm",
    "train.end_lr_fraction",
    "train.max_eval_batches",
    "train.stage1_max_steps",
    "eval.max_examples",
    "eval.subset_seed",
    "train.text_weight",
    "train.rating_weight",
)


# Dicts whose keys are not fixed: an architecture's own settings, a file's column names.
FREE_FORM = ("data.columns", "model.decoder", "model.encoder")


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


def get(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        out.add(name)
        if isinstance(value, ml_collections.ConfigDict):
            out |= _keys(value, name + ".")
    return out


def flat_items(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf, sorted: what ``research config`` prints."""
    out = []
    for key, value in sorted(cfg.items()):
        if isinstance(value, ml_collections.ConfigDict):
            out += flat_items(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _unknown_key_error(key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, sorted(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"config key {key!r} does not exist{hint}")


def _validate_architecture(cfg: ml_collections.ConfigDict, kind: str) -> None:
    """``model.<kind>`` against its family's config: no unknown keys (with "did you mean"),
    right types, the family's invariants (e.g. n_embd divisible by n_head)."""
    scratch = cfg.model[kind]
    family = scratch_family(scratch, kind)
    fields = {f.name for f in dataclasses.fields(family.config_cls)} | {"model_type"}
    for key in sorted(scratch.keys()):
        if key not in fields:
            raise _unknown_key_error(f"model.{kind}.{key}", [f"model.{kind}.{f}" for f in fields])
    values = {k: v for k, v in scratch.to_dict().items() if k != "model_type"}
    family.config_cls.from_dict(values, source=f"model.{kind}")


def _non_finite(cfg: ml_collections.ConfigDict) -> str | None:
    for key, value in flat_items(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key}={value!r} must be a finite number"
    return None


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raise :class:`ConfigError` for the first problem, naming its key."""
    known = _keys(default_config())
    for key in sorted(_keys(cfg) - known):
        if not key.startswith(tuple(f"{k}." for k in FREE_FORM)):
            raise _unknown_key_error(key, known)
    problem = _non_finite(cfg)
    if problem:
        raise ConfigError(problem)
    for key, valid in CHOICES.items():
        if get(cfg, key) not in valid:
            shown = list(valid) if len(valid) < 30 else list(valid[:8]) + ["..."]
            raise ConfigError(f"{key}={get(cfg, key)!r} is not valid; valid choices: {shown}")
    for key in POSITIVE:
        value = get(cfg, key)
        if not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{key}={value!r} must be a positive number")
    for key in NON_NEGATIVE:
        value = get(cfg, key)
        if not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{key}={value!r} must be >= 0")
    for key in ("train.trainable", "train.stage1_trainable"):
        groups = tuple(get(cfg, key))
        if not groups or set(groups) - set(GROUPS):
            raise ConfigError(f"{key}={groups!r}: choose a non-empty subset of {list(GROUPS)}")
        if "lora" in groups and cfg.model.lora.rank == 0:
            raise ConfigError(f"{key} has 'lora', but model.lora.rank=0 adds no adapters")
    try:
        conditioning.parse_conditioning(cfg.model.conditioning)
        LoRAConfig.from_config(cfg.model.lora)
        for name, hp in conditioning.hyperparameters().items():
            hp.validate(cfg.model[name])
        validate_data_config(cfg.data)
        SamplingConfig.from_config(cfg.sampling)
        for kind in ("decoder", "encoder"):
            _validate_architecture(cfg, kind)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    _check_encoder_has_input(cfg)
    if cfg.train.batch_size % cfg.train.accum_steps:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by "
            f"train.accum_steps={cfg.train.accum_steps}"
        )


def _check_encoder_has_input(cfg: ml_collections.ConfigDict) -> None:
    """What reads the encoder needs ``data.encoder_input``: "none" gives the encoder no text."""
    if cfg.data.encoder_input != "none":
        return
    inputs = [value for value in DATA_CHOICES["encoder_input"] if value != "none"]
    if conditioning.needs_encoder(conditioning.parse_conditioning(cfg.model.conditioning)):
        key, value = "model.conditioning", cfg.model.conditioning
        others = [
            name
            for name in conditioning.valid_conditionings()
            if not conditioning.needs_encoder(conditioning.parse_conditioning(name))
        ]
    elif HEADS[cfg.model.rating_head].reads == "encoder":
        key, value = "model.rating_head", cfg.model.rating_head
        others = [name for name, head in HEADS.items() if head.reads != "encoder"]
    else:
        return
    raise ConfigError(
        f"{key}={value!r} reads the encoder, but data.encoder_input='none' gives it nothing "
        f"to read; set data.encoder_input to one of {inputs}, or {key} to one of {others}"
    )


def parse_value(text: str) -> Any:
    """Command-line text -> Python value: numbers, booleans, tuples; anything else a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Set ``cfg.<dotted>`` from command-line text, keeping the default's type."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise _unknown_key_error(dotted, _keys(cfg))
        if i < len(parts) - 1:
            node = node[part]
    key, old, value = parts[-1], node[parts[-1]], parse_value(text)
    if isinstance(old, str) and not isinstance(value, str):
        value = text  # e.g. a folder named "123"
    elif isinstance(old, bool) != isinstance(value, bool) and old is not None:
        raise ConfigError(f"config.{dotted}: expected {type(old).__name__}, got {text!r}")
    elif isinstance(old, float) and isinstance(value, int):
        value = float(value)
    elif isinstance(old, tuple | list) and isinstance(value, str):
        value = (value,)
    elif isinstance(old, tuple | list) and isinstance(value, list | tuple):
        value = tuple(value)
    elif old is not None and not isinstance(value, type(old)):
        raise ConfigError(
            f"config.{dotted}: expected {type(old).__name__} like {old!r}, got {text!r}"
        )
    with node.unlocked():
        node[key] = value


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--config.a.b=value`` (or ``--config.a.b value``) from other arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                key, value = arg[len("--config.") :].split("=", 1)
            elif i + 1 < len(argv):
                key, value = arg[len("--config.") :], argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"{arg} has no value; write {arg}=VALUE")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"research_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    return module.get_config()


def load_config(
    path: str | Path | None, overrides: Iterable[tuple[str, str]] = ()
) -> ml_collections.ConfigDict:
    """The config of ``path`` (default: :func:`default_config`) with overrides, validated."""
    return resolve(load_config_file(path) if path else default_config(), overrides)


def resolve(
    cfg: ml_collections.ConfigDict, overrides: Iterable[tuple[str, str]] = ()
) -> ml_collections.ConfigDict:
    """``cfg`` (changed in place) with overrides applied, unset tokenizers following the init
    folders, validated: what ``research train`` runs for a config file and its overrides."""
    for key, value in overrides:
        apply_override(cfg, key, value)
    _tokenizers_follow_models(cfg)
    validate(cfg)
    return cfg


def _tokenizers_follow_models(cfg: ml_collections.ConfigDict) -> None:
    """Unset ``data.*_tokenizer`` take the pretrained folders' own: targets are tokenised by
    the decoder's tokenizer, encoder inputs by the encoder's."""
    if not cfg.data.decoder_tokenizer and cfg.init.decoder:
        cfg.data.decoder_tokenizer = tokenizer_source(cfg.init.decoder, "decoder")
    if not cfg.data.encoder_tokenizer and cfg.init.encoder not in ("", "minilm"):
        cfg.data.encoder_tokenizer = tokenizer_source(cfg.init.encoder, "encoder")


def from_json_dict(raw: dict[str, Any]) -> ml_collections.ConfigDict:
    """A resolved config saved in a workdir (run.json) back as a validated ConfigDict.

    Keys added to the defaults after the run was recorded take their default values (which
    keep the old behaviour), so older runs still evaluate.
    """
    cfg = _with_defaults(default_config().to_dict(), _tuples(raw))
    cfg = ml_collections.ConfigDict(cfg)
    validate(cfg)
    return cfg


def _with_defaults(defaults: dict, saved: dict, prefix: str = "") -> dict[str, Any]:
    """``saved`` plus the keys only ``defaults`` has; free-form dicts (model.decoder, ...)
    are taken as saved."""
    merged = dict(saved)
    for key, value in defaults.items():
        name = f"{prefix}{key}"
        if key not in saved:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(saved[key], dict) and name not in FREE_FORM:
            merged[key] = _with_defaults(value, saved[key], name + ".")
    return merged


def _tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
