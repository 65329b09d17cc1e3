"""How the encoder (or the user/item ids) reaches the decoder: one registry, one class each.

Every method turns what it reads into :class:`DecoderInputs`, the decoder's hooks; methods
combine with ``+`` (``prefix+id_prompt``) by summing their offsets and concatenating their
prefixes. Sizes below: ``E`` encoder width, ``D`` decoder width,
``k`` prefix length, ``U``/``I`` user/item table sizes, ``L`` decoder layers with cross-attention.

==================  ============================================  =============================
method              what the decoder gets                         extra parameters
==================  ============================================  =============================
none                nothing (plain GPT-2 language model)          0
prefix              ``k`` soft-prompt vectors from the pooled     ``E*D + D + D*k*D + k*D``
                    encoder output through an MLP
cross_attention     a cross-attention sublayer in every n-th      ``L * (2*D*D + 2*E*D + 6D)``
                    block over all encoder states
additive            the pooled encoder vector, projected, added   ``E*D + D``
                    to every token embedding
id_prompt           PEPLER's continuous prompt: a user and an     ``(U + I) * D``
                    item embedding as two prefix vectors
==================  ============================================  =============================

A method is a :class:`ConditioningMethod` subclass decorated with :func:`register`; it declares
its hyperparameters (config keys ``model.<name>`` with defaults and checks), the decoder
sublayers whose parameters are its own, the batch ids it reads, and builds itself from the
``GeneratorSpec`` (``from_spec``). The config defaults and validation, the valid combinations
and the generator all read the registry, so a new method is one class (and its tests).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.decoder_inputs import DecoderInputs

POOLINGS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
    """A method's setting, read from ``model.<name>`` (config default: ``default``)."""

    name: str
    default: Any
    check: Callable[[Any], bool]
    rule: str  # what ``check`` demands, for the error message
    doc: str = ""

    def validate(self, value: Any) -> None:
        if not self.check(value):
            raise ValueError(f"model.{self.name}={value!r}: {self.rule}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


POOLING = Hyperparameter(
    "pooling",
    "mean",
    lambda v: v in POOLINGS,
    f"valid choices are {list(POOLINGS)}",
    "how prefix/additive summarise the encoder: cls or mean",
)


@dataclasses.dataclass(frozen=True)
class Sources:
    """What a method may read. ``encoder_states`` ``[batch, enc_len, E]``, ``encoder_mask``
    ``[batch, enc_len]``; ``ids`` the batch's per-row ids a method ``reads`` (``user``,
    ``item``: ``[batch]`` int, 0 = unseen in training)."""

    encoder_states: jax.Array | None
    encoder_mask: jax.Array | None
    ids: Mapping[str, jax.Array]


class ConditioningMethod(nn.Module):
    """Base of every method: ``__call__(sources) -> DecoderInputs`` plus what it declares.

    Adding a method = a subclass decorated with :func:`register` (in its own module, or in a
    test): config defaults, validation, the valid combinations and parameter groups follow.
    """

    method_name: ClassVar[str]
    needs_encoder: ClassVar[bool] = False
    combinable: ClassVar[bool] = True  # may join others with '+' (else only alone)
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    # Decoder sublayer names whose parameters count as this method's (group "conditioning").
    owned_decoder_params: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()  # per-row id keys of the batch, [batch] int

    @classmethod
    def from_spec(cls, spec: Any, dtype: Any) -> ConditioningMethod:
        """The module for a ``GeneratorSpec`` (``spec.option(name)``, ``spec.d_model``)."""
        return cls()

    @classmethod
    def decoder_options(cls, spec: Any) -> dict[str, Any]:
        """Keyword arguments the decoder module needs for this method's hooks."""
        return {}


METHODS: dict[str, type[ConditioningMethod]] = {}


def register(method: type[ConditioningMethod]) -> type[ConditioningMethod]:
    """Add ``method`` to :data:`METHODS` under ``method.method_name`` (a class decorator)."""
    if method.method_name in METHODS:
        raise ValueError(f"conditioning method {method.method_name!r} is registered twice")
    known = hyperparameters()
    for hp in method.hyperparameters:
        if hp.name in known and known[hp.name] != hp:
            raise ValueError(
                f"{method.method_name}: hyperparameter {hp.name!r} clashes with another"
            )
    METHODS[method.method_name] = method
    return method


def hyperparameters(methods: tuple[str, ...] | None = None) -> dict[str, Hyperparameter]:
    """Every registered method's hyperparameters by name (or only those of ``methods``)."""
    chosen = METHODS.values() if methods is None else [METHODS[m] for m in methods]
    return {hp.name: hp for method in chosen for hp in method.hyperparameters}


def owned_decoder_params() -> frozenset[str]:
    return frozenset(name for m in METHODS.values() for name in m.owned_decoder_params)


def pool(states: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """``[batch, seq, E]`` -> ``[batch, E]``: the [CLS] state, or the mean over real tokens."""
    if how == "cls":
        return states[:, 0]
    weights = mask.astype(states.dtype)[..., None]
    return (states * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


@register
class NoConditioning(ConditioningMethod):
    """``none``: the decoder sees only its own tokens; the baseline that cannot condition."""

    method_name: ClassVar[str] = "none"
    combinable: ClassVar[bool] = False

    def __call__(self, sources: Sources) -> DecoderInputs:
        return DecoderInputs()


@register
class SoftPrefix(ConditioningMethod):
    """``prefix``: pooled encoder output -> MLP -> ``k`` vectors prepended as a soft prompt."""

    d_model: int
    prefix_length: int = 4
    pooling: str = "mean"
    dtype: Any = jnp.float32

    method_name: ClassVar[str] = "prefix"
    needs_encoder: ClassVar[bool] = True
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = (
        Hyperparameter("prefix_length", 4, _positive_int, "must be a positive integer"),
        POOLING,
    )

    @classmethod
    def from_spec(cls, spec, dtype):
        return cls(spec.d_model, spec.option("prefix_length"), spec.option("pooling"), dtype)

    @nn.compact
    def __call__(self, sources: Sources) -> DecoderInputs:
        pooled = pool(sources.encoder_states, sources.encoder_mask, self.pooling)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)  # noqa: E731
        h = jnp.tanh(dense(self.d_model, "hidden")(pooled))
        prefix = dense(self.prefix_length * self.d_model, "out")(h)
        return DecoderInputs(prefix_embeds=prefix.reshape(-1, self.prefix_length, self.d_model))


@register
class CrossAttentionConditioning(ConditioningMethod):
    """``cross_attention``: hands all encoder states to the decoder's cross-attention blocks.

    The sublayers themselves live in the decoder (``research/models/gpt2.py``,
    ``CrossAttention``, parameters ``decoder/h_i/crossattention`` and ``ln_cross_attn``) and
    count as conditioning parameters. Their output projection starts at zero.
    """

    method_name: ClassVar[str] = "cross_attention"
    needs_encoder: ClassVar[bool] = True
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = (
        Hyperparameter(
            "cross_attention_every",
            1,
            _positive_int,
            "must be a positive integer",
            "cross-attention in every n-th decoder block",
        ),
    )
    owned_decoder_params: ClassVar[tuple[str, ...]] = ("crossattention", "ln_cross_attn")

    @classmethod
    def decoder_options(cls, spec):
        return {"cross_attention_every": spec.option("cross_attention_every")}

    def __call__(self, sources: Sources) -> DecoderInputs:
        return DecoderInputs(
            encoder_states=sources.encoder_states, encoder_mask=sources.encoder_mask
        )


@register
class AdditiveConditioning(ConditioningMethod):
    """``additive``: pooled encoder output, projected (zero-initialised), added to every token."""

    d_model: int
    pooling: str = "mean"
    dtype: Any = jnp.float32

    method_name: ClassVar[str] = "additive"
    needs_encoder: ClassVar[bool] = True
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = (POOLING,)

    @classmethod
    def from_spec(cls, spec, dtype):
        return cls(spec.d_model, spec.option("pooling"), dtype)

    @nn.compact
    def __call__(self, sources: Sources) -> DecoderInputs:
        pooled = pool(sources.encoder_states, sources.encoder_mask, self.pooling)
        offset = nn.Dense(
            self.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.zeros,
            name="proj",
        )(pooled)
        return DecoderInputs(embed_offset=offset)


@register
class IdPrompt(ConditioningMethod):
    """``id_prompt``: PEPLER's continuous prompt, a learned user and item vector as a prefix.

    Id 0 is reserved for users/items unseen in training, so test-time strangers get a
    (trained) generic vector instead of an index error.
    """

    d_model: int
    num_users: int
    num_items: int

    method_name: ClassVar[str] = "id_prompt"
    reads: ClassVar[tuple[str, ...]] = ("user", "item")

    @classmethod
    def from_spec(cls, spec, dtype):
        return cls(spec.d_model, spec.num_users, spec.num_items)

    @nn.compact
    def __call__(self, sources: Sources) -> DecoderInputs:
        user = nn.Embed(self.num_users, self.d_model, embedding_init=_pepler_uniform, name="user")
        item = nn.Embed(self.num_items, self.d_model, embedding_init=_pepler_uniform, name="item")
        prefix = jnp.stack([user(sources.ids["user"]), item(sources.ids["item"])], 1)
        return DecoderInputs(prefix_embeds=prefix)


def _pepler_uniform(key, shape, dtype=jnp.float32):
    """PEPLER initialises both id tables uniformly in [-0.1, 0.1]."""
    return jax.random.uniform(key, shape, dtype, -0.1, 0.1)


def valid_conditionings() -> tuple[str, ...]:
    """Every valid ``model.conditioning``: a non-combinable method alone, or any set of the
    combinable ones joined in registration order (prefixes concatenate in it, offsets add)."""
    alone = tuple(name for name, m in METHODS.items() if not m.combinable)
    combinable = [name for name, m in METHODS.items() if m.combinable]
    return alone + tuple(
        "+".join(combo)
        for n in range(1, len(combinable) + 1)
        for combo in itertools.combinations(combinable, n)
    )


def parse_conditioning(spec: str) -> tuple[str, ...]:
    """``"prefix+id_prompt"`` -> ``("prefix", "id_prompt")``; errors list the valid choices."""
    parts = tuple(p.strip() for p in spec.split("+"))
    if len(parts) == 1 and parts[0] in METHODS and not METHODS[parts[0]].combinable:
        return parts
    canonical = tuple(name for name, m in METHODS.items() if m.combinable and name in parts)
    unknown = [p for p in parts if p not in METHODS]
    if unknown or len(set(parts)) != len(parts) or len(canonical) != len(parts):
        problem = f"unknown method {unknown[0]!r}" if unknown else "impossible combination"
        shown = list(valid_conditionings())
        shown = shown if len(shown) < 40 else shown[:12] + ["..."]
        raise ValueError(
            f"model.conditioning={spec!r}: {problem}. Valid methods: {sorted(METHODS)}; "
            f"combine with '+', e.g. 'prefix+id_prompt'; valid choices: {shown}"
        )
    return canonical


def needs_encoder(methods: tuple[str, ...]) -> bool:
    return any(METHODS[m].needs_encoder for m in methods)
