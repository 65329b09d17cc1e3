"""Model families: what the library needs to know about one decoder or encoder architecture.

A family lives in one module (``research/models/gpt2.py``, ``research/models/bert.py``) that
ends with one call, ``register(DecoderFamily(...))`` or ``register(EncoderFamily(...))``,
keyed by the ``model_type`` of Hugging Face's ``config.json``. Everything else reads the
registry: the generator builds ``family.module_cls``, sampling asks the family for its cache
and position limit, ``research/models/hf.py`` converts checkpoints with ``family.hf``, the
config checks ``model.decoder.*``/``model.encoder.*`` against ``family.config_cls``.

What a family's pieces must do:

* ``config_cls``: a frozen dataclass with a class attribute ``model_type``,
  ``from_dict(raw, source)`` (reads a ``config.json``, ignoring keys it does not use; usually
  :func:`config_from_dict`, which applies the class's ``checks``, a :class:`FieldChecks`) and
  ``to_hf_dict()`` (what ``save_pretrained`` writes).
* decoder ``module_cls(config, dtype, attention_impl=None, **hooks)``, where ``hooks`` are the
  conditioning methods' ``decoder_options`` (e.g. ``cross_attention_every``);
  ``__call__(input_ids, attention_mask=None, inputs=None, *, cache=None, cache_index=0,
  deterministic=True)`` with ``inputs`` a ``DecoderInputs``; logits
  ``[batch, prefix + seq, vocab]``, or ``(logits, cache)`` when given a cache; with
  ``return_hidden=True`` (and no cache) ``(logits, hidden)``, ``hidden`` the final hidden
  states ``[batch, prefix + seq, hidden]`` (the ``decoder`` rating head reads them); with
  ``last_only=True`` the logits of the last position alone, ``[batch, 1, vocab]`` (sampling's
  prefill reads no other, and the LM head over every prompt position is its largest product).
* encoder ``module_cls(config, dtype)``; ``__call__(input_ids, attention_mask,
  deterministic=...)`` returns an object whose ``last_hidden_state`` is ``[batch, seq, E]``.
* ``hf``: the checkpoint conversion table (:class:`HFConversion`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Collection
from typing import Any

import jax

# Layout changes between a Hugging Face tensor and our parameter. torch.nn.Linear stores
# [out, in]; a Flax Dense kernel is [in, out]. Both changes are their own inverse.
KEEP = "keep"
TRANSPOSE = "transpose"

# The families that ship with the library: their modules register them when imported.
BUILTIN_MODULES = (
    "research.models.gpt2",
    "research.models.llama",
    "research.models.bert",
    "research.models.roberta",
    "research.models.distilbert",
)


@dataclasses.dataclass(frozen=True)
class HFConversion:
    """How one family's parameters map to Hugging Face tensor names."""

    # (hf name, flax path, layout), ``{i}`` standing for the layer index; or a function of
    # the config giving them (optional biases, untied heads).
    table: tuple[tuple[str, str, str], ...] | Callable[[Any], tuple[tuple[str, str, str], ...]]
    num_layers: Callable[[Any], int]
    save_prefix: str  # what transformers' save_pretrained puts before the table's names
    # Names transformers may add around the table's: task-model prefixes.
    strip_prefixes: tuple[str, ...]
    buffers: str  # regex of non-parameter tensors that old checkpoints carry
    # A tensor that transformers saves but that equals another one (a tied LM head).
    tied: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class DecoderFamily:
    """A decoder architecture (the generator's language model)."""

    model_type: str
    config_cls: type
    module_cls: type
    hf: HFConversion
    # (config, batch, max_len, dtype) -> an empty KV cache pytree for decoding.
    init_cache: Callable[[Any, int, int, Any], Any]
    # (cache, rows [n] int) -> the cache whose row j is row rows[j] (beam search).
    reorder_cache: Callable[[Any, Any], Any]
    position_limit: Callable[[Any], int]  # the most positions the decoder can see
    hidden_size: Callable[[Any], int]  # D, the width conditioning methods write
    # (bos, eos, pad) ids; generated rows hold pad after their EOS. (Tokenizers come from the
    # model folder: research/data/tokenizers.py, decoder_tokenizer.)
    special_ids: Callable[[Any], tuple[int, int, int]]
    # Default LoRA targets: regexes of layer paths (research/models/lora.py), attention q/k/v/o.
    lora_targets: tuple[str, ...] = ()
    # (folder) -> the tokenizer of a model folder that has no tokenizer_config.json (GPT-2:
    # its BPE files, else the packaged ones); None: such a folder must hold a tokenizer.json.
    folder_tokenizer: Callable[[Any], Any] | None = None
    kind = "decoder"


@dataclasses.dataclass(frozen=True)
class EncoderFamily:
    """An encoder architecture (reads the conditioning text)."""

    model_type: str
    config_cls: type
    module_cls: type
    hf: HFConversion
    position_limit: Callable[[Any], int]
    hidden_size: Callable[[Any], int]  # E, the width of last_hidden_state
    lora_targets: tuple[str, ...] = ()  # as DecoderFamily.lora_targets
    kind = "encoder"


FAMILIES: dict[str, DecoderFamily | EncoderFamily] = {}


def register(family: DecoderFamily | EncoderFamily) -> DecoderFamily | EncoderFamily:
    """Add ``family`` under its ``model_type``; a second family of one type is an error."""
    if family.model_type in FAMILIES:
        raise ValueError(f"model family {family.model_type!r} is registered twice")
    FAMILIES[family.model_type] = family
    return family


def unregister(model_type: str) -> None:
    """Remove a family (tests that register their own use this to clean up)."""
    FAMILIES.pop(model_type, None)


def family(model_type: str, kind: str | None = None, source: str = "model_type") -> Any:
    """The family registered as ``model_type`` (of ``kind`` "decoder"/"encoder", if given);
    an unknown one is an error naming ``source`` and listing the valid types."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    found = FAMILIES.get(model_type)
    if found is None or (kind is not None and found.kind != kind):
        valid = sorted(t for t, f in FAMILIES.items() if kind is None or f.kind == kind)
        what = f" as a {kind}" if kind else ""
        raise ValueError(f"{source}={model_type!r} is not supported{what}; supported: {valid}")
    return found


def reorder_self_cache(cache: dict[str, Any], rows: Any) -> dict[str, Any]:
    """``reorder_cache`` for caches laid out ``{"self": [(k, v) per layer], "cross": ...}``
    (GPT-2, Llama): row j of the self-attention cache becomes row ``rows[j]``. The beams of a
    sequence share the encoder keys/values in ``cache["cross"]``: nothing to reorder there."""
    return {**cache, "self": jax.tree.map(lambda x: x[rows], cache["self"])}


def _has_type(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits one alternative of a dataclass field's (string) annotation."""
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    if annotation == "None":
        return value is None
    if annotation.startswith("tuple["):
        return isinstance(value, tuple | list)
    return True  # an annotation this check does not know


@dataclasses.dataclass(frozen=True)
class FieldChecks:
    """What a family config's fields must satisfy beyond their types; a config class sets
    ``checks = FieldChecks(...)`` and :func:`check_config` applies it."""

    choices: tuple[tuple[str, Collection], ...] = ()  # (field, its valid values)
    positive: tuple[str, ...] = ()  # sizes: > 0
    divisible: tuple[tuple[str, str], ...] = ()  # (a, b): a % b == 0, checked once sizes are > 0
    probabilities: tuple[str, ...] = ()  # dropout rates: in [0, 1)


def check_model_type(cls: type, raw: dict[str, Any], source: str) -> None:
    """A ``config.json`` of another model type than ``cls.model_type`` is an error."""
    model_type = raw.get("model_type", cls.model_type)
    if model_type != cls.model_type:
        raise ValueError(f"{source}: model_type={model_type!r} is not {cls.model_type}")


def known_fields(cls: type, raw: dict[str, Any], skip_none: bool = False) -> dict[str, Any]:
    """The entries of ``raw`` that are fields of ``cls`` (a ``config.json`` holds many that
    change nothing we compute); with ``skip_none``, a None value leaves the field's default."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in raw.items() if k in names and not (skip_none and v is None)}


def config_from_dict(cls: type, raw: dict[str, Any], source: str, skip_none: bool = False) -> Any:
    """``cls`` from a ``config.json`` dict (see :func:`known_fields`), checked."""
    check_model_type(cls, raw, source)
    config = cls(**known_fields(cls, raw, skip_none))
    check_config(config, source)
    return config


def check_config(config: Any, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the field when a field of a family's config
    is not one of its choices, has the wrong type (``"128"`` for an int), is a float that is
    not finite, or breaks one of the config's :class:`FieldChecks`
    (``"n_embd=130 must be divisible by n_head=4"``); those are only evaluated once every
    type is right."""
    checks = getattr(config, "checks", FieldChecks())
    for name, valid in checks.choices:
        value, valid = getattr(config, name), sorted(valid)
        if value not in valid:
            raise ValueError(f"{source}: {name}={value!r} is not supported; valid: {valid}")
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        allowed = [a.strip() for a in str(f.type).split("|")]
        if not any(_has_type(value, a) for a in allowed):
            raise ValueError(f"{source}: {f.name}={value!r} must be {f.type}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{source}: {f.name}={value!r} must be a finite number")
    value = functools.partial(getattr, config)
    rules = {f"{name}={value(name)!r} must be > 0": value(name) > 0 for name in checks.positive}
    if all(rules.values()):
        for a, b in checks.divisible:
            rules[f"{a}={value(a)} must be divisible by {b}={value(b)}"] = value(a) % value(b) == 0
    for name in checks.probabilities:
        rules[f"{name}={value(name)!r} must be in [0, 1)"] = 0 <= value(name) < 1
    for rule, holds in rules.items():
        if not holds:
            raise ValueError(f"{source}: {rule}")


def decoder_family(config: Any) -> DecoderFamily:
    return family(config.model_type, "decoder")


def encoder_family(config: Any) -> EncoderFamily:
    return family(config.model_type, "encoder")
