"""Build the generator a config describes: architectures, pretrained parts, parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from research import assets
from research.models import families
from research.models.conditioning import hyperparameters, needs_encoder, parse_conditioning
from research.models.generator import Generator, GeneratorSpec, init_generator, load_part
from research.models.hf import read_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    if folder:
        family, config = read_config(_folder(folder))
        if family.kind != kind:
            raise ValueError(f"init.{kind}={folder!r} holds a {config.model_type} model")
        return config
    raw = {k: v for k, v in scratch.to_dict().items() if k != "model_type"}
    return scratch_family(scratch, kind).config_cls.from_dict(raw, source=f"model.{kind}")


def build_generator(
    cfg: ml_collections.ConfigDict, num_users: int, num_items: int, rng: jax.Array | None = None
) -> tuple[Generator, dict[str, Any] | None]:
    """``(model, params)`` for ``cfg.model``/``cfg.init``; params are None when ``rng`` is.

    Pretrained folders (``init.decoder``, ``init.encoder``) fix their architecture and, with
    ``rng``, their weights; otherwise ``model.decoder``/``model.encoder`` describe a network
    trained from scratch.
    """
    methods = parse_conditioning(cfg.model.conditioning)
    uses_encoder = needs_encoder(methods)
    spec = GeneratorSpec(
        decoder=_architecture(cfg.init.decoder, cfg.model.decoder, "decoder"),
        encoder=(
            _architecture(cfg.init.encoder, cfg.model.encoder, "encoder") if uses_encoder else None
        ),
        conditioning=methods,
        options={name: cfg.model[name] for name in hyperparameters(methods)},
        num_users=num_users,
        num_items=num_items,
    )
    model = Generator(spec, DTYPES[cfg.model.dtype], cfg.model.attention_impl or None)
    if rng is None:
        return model, None
    pretrained = {}
    if cfg.init.decoder:
        pretrained["decoder"] = load_part(_folder(cfg.init.decoder), "decoder")[1]
    if cfg.init.encoder and uses_encoder:
        pretrained["encoder"] = load_part(_folder(cfg.init.encoder), "encoder")[1]
    return model, init_generator(model, rng, pretrained)
