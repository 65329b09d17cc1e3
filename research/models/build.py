"""Build the generator a config describes: architectures, pretrained parts, parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from research import assets
from research.errors import ExpectedError
from research.models import families
from research.models.conditioning import hyperparameters, needs_encoder, parse_conditioning
from research.models.generator import Generator, GeneratorSpec, init_generator, load_part
from research.models.hf import read_config
from research.models.lora import LoRAConfig
from research.models.rating import HEADS, RatingHeadSpec
from research.runs import is_run_source, run_part_config, run_part_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class BuildError(ExpectedError, ValueError):
    """A config whose model cannot be built from its init folders or runs; names the key."""


def _folder(name: str) -> str:
    return str(assets.minilm_folder()) if name == "minilm" else name


# The family of a from-scratch architecture whose config names none (run.json files before
# model.decoder.model_type existed).
DEFAULT_FAMILIES = {"decoder": "gpt2", "encoder": "bert"}


def scratch_family(scratch: ml_collections.ConfigDict | dict, kind: str) -> Any:
    """The family ``model.<kind>.model_type`` names."""
    model_type = dict(scratch).get("model_type", DEFAULT_FAMILIES[kind])
    return families.family(model_type, kind, source=f"model.{kind}.model_type")


def _architecture(folder: str, scratch: ml_collections.ConfigDict, kind: str):
    if is_run_source(folder):
        return run_part_config(folder, kind)
    if folder:
        family, config = read_config(_folder(folder))
        if family.kind != kind:
            raise BuildError(f"init.{kind}={folder!r} holds a {config.model_type} model")
        return config
    raw = {k: v for k, v in scratch.to_dict().items() if k != "model_type"}
    return scratch_family(scratch, kind).config_cls.from_dict(raw, source=f"model.{kind}")


def has_encoder(cfg: ml_collections.ConfigDict) -> bool:
    """Whether ``cfg``'s model has an encoder: its conditioning or its rating head reads one."""
    methods = parse_conditioning(cfg.model.conditioning)
    return needs_encoder(methods) or HEADS[cfg.model.rating_head].reads == "encoder"


def part_architecture(cfg: ml_collections.ConfigDict, kind: str, source: str):
    """The decoder or encoder config that ``cfg`` builds (``source`` names it in errors)."""
    if kind == "encoder" and not has_encoder(cfg):
        raise BuildError(
            f"{source} has no encoder (its model.conditioning={cfg.model.conditioning!r} and "
            f"model.rating_head={cfg.model.rating_head!r} read none)"
        )
    return _architecture(cfg.init[kind], cfg.model[kind], kind)


def lora_config(cfg: ml_collections.ConfigDict) -> LoRAConfig | None:
    """``model.lora`` (None when its rank is 0, or in run.json files from before LoRA)."""
    lora = LoRAConfig.from_config(cfg.model.get("lora", {}))
    return lora if lora.rank else None


def pretrained_part(source: str, kind: str) -> dict[str, Any]:
    """Weights of a Hugging Face folder (or "minilm"), or of a run's part (``run:WORKDIR``)."""
    if is_run_source(source):
        return run_part_params(source, kind)[1]
    return load_part(_folder(source), kind)[1]


def build_generator(
    cfg: ml_collections.ConfigDict,
    num_users: int,
    num_items: int,
    rng: jax.Array | None = None,
    rating_mean: float | None = None,
) -> tuple[Generator, dict[str, Any] | None]:
    """``(model, params)`` for ``cfg.model``/``cfg.init``; params are None when ``rng`` is.

    ``rating_mean`` (the training split's mean rating, ``Dataset.rating_mean``) is where a
    rating head starts; a head needs it.

    Pretrained folders (``init.decoder``, ``init.encoder``), or ``run:WORKDIR`` (that run's best
    checkpoint, ``research/runs.py``), fix their architecture and, with ``rng``, their weights;
    otherwise ``model.decoder``/``model.encoder`` describe a network
    trained from scratch.
    """
    methods = parse_conditioning(cfg.model.conditioning)
    if cfg.model.rating_head != "none" and rating_mean is None:
        raise BuildError(
            f"model.rating_head={cfg.model.rating_head!r} predicts ratings, but the train split "
            f"of data.source={cfg.data.source!r} has none"
        )
    rating = RatingHeadSpec(
        cfg.model.rating_head,
        cfg.model.rating_hidden_size,
        cfg.model.rating_layers,
        cfg.model.pooling,
        float(rating_mean or 0.0),
    )
    uses_encoder = has_encoder(cfg)
    spec = GeneratorSpec(
        decoder=part_architecture(cfg, "decoder", "the config"),
        encoder=part_architecture(cfg, "encoder", "the config") if uses_encoder else None,
        conditioning=methods,
        options={name: cfg.model[name] for name in hyperparameters(methods)},
        num_users=num_users,
        num_items=num_items,
        rating=rating,
        lora=lora_config(cfg),
    )
    model = Generator(spec, DTYPES[cfg.model.dtype], cfg.model.attention_impl or None)
    if rng is None:
        return model, None
    pretrained = {}
    if cfg.init.decoder:
        pretrained["decoder"] = pretrained_part(cfg.init.decoder, "decoder")
    if cfg.init.encoder and uses_encoder:
        pretrained["encoder"] = pretrained_part(cfg.init.encoder, "encoder")
    return model, init_generator(model, rng, pretrained)
