"""The review generator: optional encoder + conditioning + GPT-2 decoder, as one Flax module.

Batches are dicts of arrays (``research/data``): ``decoder_ids``/``decoder_mask`` ``[batch, T]``,
``encoder_ids``/``encoder_mask`` ``[batch, S]`` when an encoder is used, ``user``/``item``
``[batch]``. Parameters split into three groups that training can freeze separately:
``encoder``, ``decoder`` and ``conditioning`` (everything the conditioning method added,
including the decoder sublayers a method owns, e.g. cross-attention, and the rating head of
``research/models/rating.py``); with ``model.lora``, a fourth, ``lora``, holds the adapters
(``research/models/lora.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from research.models import conditioning as cond
from research.models import families
from research.models import lora as lora_lib
from research.models.decoder_inputs import DecoderInputs
from research.models.hf import CheckpointError, load_pretrained
from research.models.rating import RatingHeadSpec, RatingSources, make_head

GROUPS = ("encoder", "decoder", "conditioning", "lora")


@dataclasses.dataclass(frozen=True)
class GeneratorSpec:
    """Everything that fixes the generator's architecture (hashable, so jit can key on it).

    ``options`` holds the conditioning methods' hyperparameters (a mapping, kept as sorted
    pairs); a missing one takes its registered default (:func:`GeneratorSpec.option`).
    """

    decoder: Any  # a decoder family's config (research/models/families.py)
    encoder: Any | None  # an encoder family's config
    conditioning: tuple[str, ...] = ("none",)
    options: Any = ()
    num_users: int = 1
    num_items: int = 1
    rating: RatingHeadSpec = RatingHeadSpec()
    lora: lora_lib.LoRAConfig | None = None  # adapters on the decoder/encoder, or none

    def __post_init__(self):
        options, known = dict(self.options), cond.hyperparameters()
        for name, value in options.items():
            if name not in known:
                raise ValueError(f"model.{name} is no conditioning hyperparameter: {sorted(known)}")
            known[name].validate(value)
        object.__setattr__(self, "options", tuple(sorted(options.items())))
        if cond.needs_encoder(self.conditioning) and self.encoder is None:
            raise ValueError(
                f"model.conditioning={'+'.join(self.conditioning)!r} reads the encoder, "
                "but no encoder is configured (set model.encoder)"
            )
        if self.rating.needs_encoder and self.encoder is None:
            raise ValueError(
                "model.rating_head='encoder' reads the encoder, but no encoder is configured "
                "(set model.encoder)"
            )

    def option(self, name: str) -> Any:
        """A conditioning hyperparameter: as set, else its registered default."""
        return dict(self.options).get(name, cond.hyperparameters()[name].default)

    @property
    def uses_encoder(self) -> bool:
        return cond.needs_encoder(self.conditioning) or self.rating.needs_encoder

    @property
    def decoder_family(self) -> families.DecoderFamily:
        return families.decoder_family(self.decoder)

    @property
    def d_model(self) -> int:
        return self.decoder_family.hidden_size(self.decoder)

    @property
    def id_keys(self) -> tuple[str, ...]:
        """The per-row id keys (``[batch]`` int) the conditioning reads from a batch."""
        reads = (key for m in self.conditioning for key in cond.METHODS[m].reads)
        return tuple(dict.fromkeys(reads))

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Every batch key conditioning reads (decoding copies those present); a batch has
        ``encoder_ids`` or a frozen encoder's cached ``encoder_states``."""
        encoder_keys = (
            ("encoder_ids", "encoder_states", "encoder_mask") if self.uses_encoder else ()
        )
        return encoder_keys + self.id_keys


class Generator(nn.Module):
    """``apply(params, batch)`` -> logits ``[batch, T, vocab]`` over the decoder tokens only."""

    spec: GeneratorSpec
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    frozen_encoder: bool = False  # the encoder does not train (in this stage): no dropout

    def setup(self):
        s = self.spec
        methods = [cond.METHODS[name] for name in s.conditioning]
        hooks = {k: v for method in methods for k, v in method.decoder_options(s).items()}
        self.decoder = s.decoder_family.module_cls(
            s.decoder, self.dtype, attention_impl=self.attention_impl, **hooks
        )
        if s.uses_encoder:
            self.encoder = families.encoder_family(s.encoder).module_cls(s.encoder, self.dtype)
        self.conditioning = {
            method.method_name: method.from_spec(s, self.dtype) for method in methods
        }
        self.rating = make_head(s.rating, s.d_model, s.num_users, s.num_items)

    def encode(self, batch: dict[str, jax.Array], deterministic: bool = True):
        """Encoder states ``[batch, S, E]`` and mask ``[batch, S]``.

        A batch that carries ``encoder_states`` (features of a frozen encoder computed once,
        ``research/train/feature_cache.py``) is read instead of running the encoder. A frozen
        encoder (``frozen_encoder``) runs without dropout, as its cached features were made.
        """
        mask = batch["encoder_mask"]
        if "encoder_states" in batch:
            return batch["encoder_states"].astype(self.dtype), mask
        deterministic = deterministic or self.frozen_encoder
        with self._adapters("encoder", deterministic):
            states = self.encoder(batch["encoder_ids"], mask, deterministic=deterministic)
        return states.last_hidden_state, mask

    def condition(self, batch: dict[str, jax.Array], deterministic: bool = True):
        """Run the encoder (if any) and every conditioning method -> ``DecoderInputs``."""
        return self._condition(batch, deterministic)[0]

    def _sources(self, batch, deterministic: bool, encode: bool) -> cond.Sources:
        """What conditioning reads; the encoder runs only when ``encode``."""
        states = mask = None
        if encode:
            states, mask = self.encode(batch, deterministic)
        return cond.Sources(states, mask, {key: batch[key] for key in self.spec.id_keys})

    def _condition(self, batch, deterministic):
        """``(DecoderInputs, Sources)``: the decoder's hooks and what they were made from."""
        sources = self._sources(batch, deterministic, self.spec.uses_encoder)
        inputs = DecoderInputs()
        for method in self.spec.conditioning:
            inputs = inputs.merge(self.conditioning[method](sources))
        return inputs, sources

    def _rate(self, batch, sources: cond.Sources, decoder_state: jax.Array | None):
        """``[batch]`` predicted ratings (None for the ``none`` head)."""
        if not self.spec.rating.predicts:
            return None
        id_vectors = None
        if self.spec.rating.reads_ids and "id_prompt" in self.spec.conditioning:
            # The prompt's two prefix vectors are the user's and the item's embeddings: the
            # MF/MLP heads share PEPLER's tables instead of owning their own.
            prompt = self.conditioning["id_prompt"](sources).prefix_embeds
            id_vectors = (prompt[:, 0], prompt[:, 1])
        return self.rating(
            RatingSources(
                user=batch.get("user"),
                item=batch.get("item"),
                id_vectors=id_vectors,
                encoder_states=sources.encoder_states,
                encoder_mask=sources.encoder_mask,
                decoder_state=decoder_state,
            )
        )

    def logits_and_rating(self, batch: dict[str, jax.Array], deterministic: bool = True):
        """``(logits [batch, T, vocab], rating [batch] or None)`` in one pass.

        The ``decoder`` head reads the final hidden state at the BOS position (the first
        decoder token, after every prefix vector), which no target token can reach.
        """
        inputs, sources = self._condition(batch, deterministic)
        wants_state = self.spec.rating.needs_decoder_state
        out = self.decode(
            batch["decoder_ids"],
            batch["decoder_mask"],
            inputs,
            deterministic=deterministic,
            return_hidden=wants_state,
        )
        logits, hidden = out if wants_state else (out, None)
        bos_state = None if hidden is None else hidden[:, inputs.prefix_length]
        return logits[:, inputs.prefix_length :], self._rate(batch, sources, bos_state)

    def predict_rating(self, batch: dict[str, jax.Array]) -> jax.Array | None:
        """``[batch]`` predicted ratings from the conditioning alone (no target tokens read)."""
        if not self.spec.rating.needs_decoder_state:  # the encoder only if the head reads it
            return self._rate(
                batch, self._sources(batch, True, self.spec.rating.needs_encoder), None
            )
        bos_id = self.spec.decoder_family.special_ids(self.spec.decoder)[0]
        bos = jnp.full((batch["user"].shape[0], 1), bos_id, jnp.int32)
        rating_batch = dict(batch, decoder_ids=bos, decoder_mask=jnp.ones_like(bos))
        return self.logits_and_rating(rating_batch)[1]

    def decode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        inputs: DecoderInputs,
        cache: dict | None = None,
        cache_index: jax.Array | int = 0,
        deterministic: bool = True,
        return_hidden: bool = False,
        last_only: bool = False,
    ):
        """The decoder under ``inputs``; see the family's module (``GPT2LMHead.__call__``) for
        the cache contract, ``return_hidden`` and ``last_only``."""
        # Passed only when set: a family that lacks an option still serves every other call.
        options = {"return_hidden": return_hidden, "last_only": last_only}
        with self._adapters("decoder", deterministic):
            return self.decoder(
                input_ids,
                attention_mask,
                inputs,
                cache=cache,
                cache_index=cache_index,
                deterministic=deterministic,
                **{name: True for name, wanted in options.items() if wanted},
            )

    def _adapters(self, part: str, deterministic: bool):
        """The LoRA adapters of ``part`` ("decoder"/"encoder"), active in a ``with`` block."""
        lora = self.spec.lora
        if lora is None or part not in lora.parts:
            return lora_lib.adapters(None, ())
        config = self.spec.decoder if part == "decoder" else self.spec.encoder
        return lora_lib.adapters(
            lora, lora.targets_for(families.family(config.model_type)), deterministic
        )

    def __call__(self, batch: dict[str, jax.Array], deterministic: bool = True) -> jax.Array:
        return self.logits_and_rating(batch, deterministic)[0]


def part_trains(spec: GeneratorSpec, part: str, trainable: tuple[str, ...]) -> bool:
    """Whether training the ``trainable`` groups changes what ``part`` ("encoder"/"decoder")
    computes: its own group trains, or LoRA adapters on it do."""
    adapted = spec.lora is not None and part in spec.lora.parts
    return part in trainable or ("lora" in trainable and adapted)


def param_group(path: tuple[str, ...]) -> str:
    """Which group a parameter (path of keys in the params tree) belongs to."""
    if path[-1] in lora_lib.ADAPTER_NAMES:
        return "lora"
    if path[0] == "encoder":
        return "encoder"
    if path[0] == "decoder":
        owned = cond.owned_decoder_params()
        return "conditioning" if any(k in owned for k in path) else "decoder"
    return "conditioning"


def parameter_counts(params: dict[str, Any]) -> dict[str, int]:
    counts = dict.fromkeys(GROUPS, 0)
    for path, leaf in traverse_util.flatten_dict(params).items():
        counts[param_group(path)] += int(np.prod(leaf.shape))
    return counts


def parameter_summary(params: dict[str, Any], trainable: tuple[str, ...] = GROUPS) -> str:
    """A small table: parameters per group, and which groups train."""
    counts = parameter_counts(params)
    rows = [f"{'group':<14}{'parameters':>14}  trainable"]
    for group in GROUPS:
        rows.append(f"{group:<14}{counts[group]:>14,}  {'yes' if group in trainable else 'no'}")
    total = sum(counts.values())
    n_train = sum(c for g, c in counts.items() if g in trainable)
    rows.append(f"{'total':<14}{total:>14,}  {n_train:,} trainable")
    return "\n".join(rows)


def example_batch(spec: GeneratorSpec, batch: int = 1, seq: int = 4) -> dict[str, jax.Array]:
    """A dummy batch with every key the generator may read (for ``init``)."""
    ids = jnp.zeros((batch, seq), jnp.int32)
    out = {"decoder_ids": ids, "decoder_mask": jnp.ones_like(ids)}
    for key in ("user", "item", *spec.id_keys):
        out[key] = jnp.zeros((batch,), jnp.int32)
    if spec.uses_encoder:
        out["encoder_ids"], out["encoder_mask"] = ids, jnp.ones_like(ids)
    return out


def init_generator(
    model: Generator,
    rng: jax.Array,
    pretrained: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Random parameters, with ``pretrained["decoder"|"encoder"]`` trees copied in.

    New parameters that a pretrained tree lacks (cross-attention sublayers) keep their
    initialisation; a pretrained tensor whose shape differs is an error naming it.
    """
    params = dict(model.init(rng, example_batch(model.spec))["params"])
    for part, tree in (pretrained or {}).items():
        if part not in params:
            raise ValueError(f"pretrained {part} given, but this generator has no {part}")
        params[part] = _overlay(params[part], tree, part)
    return params


def _overlay(target: dict, source: dict, where: str) -> dict:
    flat_t = traverse_util.flatten_dict(target, sep="/")
    for path, value in traverse_util.flatten_dict(source, sep="/").items():
        if path not in flat_t:
            raise CheckpointError(f"pretrained {where} has parameter {path} the model lacks")
        if flat_t[path].shape != value.shape:
            raise CheckpointError(
                f"pretrained {where}/{path} has shape {value.shape}, model needs {flat_t[path].shape}"
            )
        flat_t[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat_t, sep="/")


def load_part(folder: str | Path, kind: str) -> tuple[Any, dict[str, Any]]:
    """Load a Hugging Face folder for the ``kind`` ("decoder" or "encoder") slot."""
    module, params = load_pretrained(folder)
    model_type = module.config.model_type
    if families.family(model_type).kind != kind:
        raise CheckpointError(f"{folder} holds a {model_type} model; this slot needs a {kind}")
    return module.config, params
