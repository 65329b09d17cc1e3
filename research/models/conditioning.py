"""How the encoder (or the user/item ids) reaches the GPT-2 decoder: one registry, one module each.

Every method turns what it reads into :class:`DecoderInputs`, the three hooks of
``research/models/gpt2.py``; methods combine with ``+`` (``prefix+id_prompt``) by summing their
offsets and concatenating their prefixes. Sizes below: ``E`` encoder width, ``D`` decoder width,
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
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLINGS = ("cls", "mean")


@dataclasses.dataclass
class DecoderInputs:
    """What conditioning hands the decoder (all optional)."""

    prefix_embeds: jax.Array | None = None  # [batch, prefix, D]
    embed_offset: jax.Array | None = None  # [batch, D]
    encoder_states: jax.Array | None = None  # [batch, enc_len, E]
    encoder_mask: jax.Array | None = None  # [batch, enc_len]

    def merge(self, other: DecoderInputs) -> DecoderInputs:
        prefixes = [p for p in (self.prefix_embeds, other.prefix_embeds) if p is not None]
        offsets = [o for o in (self.embed_offset, other.embed_offset) if o is not None]
        return DecoderInputs(
            prefix_embeds=jnp.concatenate(prefixes, axis=1) if prefixes else None,
            embed_offset=sum(offsets[1:], offsets[0]) if offsets else None,
            encoder_states=_first(self.encoder_states, other.encoder_states),
            encoder_mask=_first(self.encoder_mask, other.encoder_mask),
        )

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_embeds is None else self.prefix_embeds.shape[1]


def _first(a, b):
    return a if a is not None else b


jax.tree_util.register_dataclass(
    DecoderInputs,
    data_fields=["prefix_embeds", "embed_offset", "encoder_states", "encoder_mask"],
    meta_fields=[],
)


@dataclasses.dataclass(frozen=True)
class Sources:
    """What a method may read. ``encoder_states`` ``[batch, enc_len, E]``, ``encoder_mask``
    ``[batch, enc_len]``, ``user``/``item`` ``[batch]`` int ids (0 = unseen in training)."""

    encoder_states: jax.Array | None
    encoder_mask: jax.Array | None
    user: jax.Array | None
    item: jax.Array | None


def pool(states: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """``[batch, seq, E]`` -> ``[batch, E]``: the [CLS] state, or the mean over real tokens."""
    if how == "cls":
        return states[:, 0]
    weights = mask.astype(states.dtype)[..., None]
    return (states * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


class NoConditioning(nn.Module):
    """``none``: the decoder sees only its own tokens; the baseline that cannot condition."""

    needs_encoder: ClassVar[bool] = False

    def __call__(self, sources: Sources) -> DecoderInputs:
        return DecoderInputs()


class SoftPrefix(nn.Module):
    """``prefix``: pooled encoder output -> MLP -> ``k`` vectors prepended as a soft prompt."""

    d_model: int
    prefix_length: int = 4
    pooling: str = "mean"
    dtype: Any = jnp.float32
    needs_encoder: ClassVar[bool] = True

    @nn.compact
    def __call__(self, sources: Sources) -> DecoderInputs:
        pooled = pool(sources.encoder_states, sources.encoder_mask, self.pooling)
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)  # noqa: E731
        h = jnp.tanh(dense(self.d_model, "hidden")(pooled))
        prefix = dense(self.prefix_length * self.d_model, "out")(h)
        return DecoderInputs(prefix_embeds=prefix.reshape(-1, self.prefix_length, self.d_model))


class CrossAttentionConditioning(nn.Module):
    """``cross_attention``: hands all encoder states to the decoder's cross-attention blocks.

    The sublayers themselves live in the decoder (``research/models/gpt2.py``,
    ``CrossAttention``, parameters ``decoder/h_i/crossattention`` and ``ln_cross_attn``) and
    count as conditioning parameters. Their output projection starts at zero.
    """

    needs_encoder: ClassVar[bool] = True

    def __call__(self, sources: Sources) -> DecoderInputs:
        return DecoderInputs(
            encoder_states=sources.encoder_states, encoder_mask=sources.encoder_mask
        )


class AdditiveConditioning(nn.Module):
    """``additive``: pooled encoder output, projected (zero-initialised), added to every token."""

    d_model: int
    pooling: str = "mean"
    dtype: Any = jnp.float32
    needs_encoder: ClassVar[bool] = True

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


class IdPrompt(nn.Module):
    """``id_prompt``: PEPLER's continuous prompt, a learned user and item vector as a prefix.

    Id 0 is reserved for users/items unseen in training, so test-time strangers get a
    (trained) generic vector instead of an index error.
    """

    d_model: int
    num_users: int
    num_items: int
    needs_encoder: ClassVar[bool] = False

    @nn.compact
    def __call__(self, sources: Sources) -> DecoderInputs:
        user = nn.Embed(self.num_users, self.d_model, embedding_init=_pepler_uniform, name="user")
        item = nn.Embed(self.num_items, self.d_model, embedding_init=_pepler_uniform, name="item")
        return DecoderInputs(prefix_embeds=jnp.stack([user(sources.user), item(sources.item)], 1))


def _pepler_uniform(key, shape, dtype=jnp.float32):
    """PEPLER initialises both id tables uniformly in [-0.1, 0.1]."""
    return jax.random.uniform(key, shape, dtype, -0.1, 0.1)


METHODS: dict[str, type[nn.Module]] = {
    "none": NoConditioning,
    "prefix": SoftPrefix,
    "cross_attention": CrossAttentionConditioning,
    "additive": AdditiveConditioning,
    "id_prompt": IdPrompt,
}

# Combinations that make sense: any set of the four real methods, in a canonical order
# (`none` only alone). Prefixes concatenate in this order, offsets add up.
_COMBINABLE = ("prefix", "cross_attention", "additive", "id_prompt")
VALID_CONDITIONINGS: tuple[str, ...] = ("none",) + tuple(
    "+".join(combo)
    for n in range(1, len(_COMBINABLE) + 1)
    for combo in itertools.combinations(_COMBINABLE, n)
)


def parse_conditioning(spec: str) -> tuple[str, ...]:
    """``"prefix+id_prompt"`` -> ``("prefix", "id_prompt")``; errors list the valid choices."""
    parts = tuple(p.strip() for p in spec.split("+"))
    canonical = tuple(m for m in _COMBINABLE if m in parts)
    if parts == ("none",):
        return parts
    unknown = [p for p in parts if p not in METHODS]
    if unknown or "none" in parts or len(set(parts)) != len(parts) or not canonical:
        problem = f"unknown method {unknown[0]!r}" if unknown else "impossible combination"
        raise ValueError(
            f"model.conditioning={spec!r}: {problem}. Valid methods: {sorted(METHODS)}; "
            f"combine with '+', e.g. 'prefix+id_prompt'. Valid choices: {list(VALID_CONDITIONINGS)}"
        )
    return canonical


def needs_encoder(methods: tuple[str, ...]) -> bool:
    return any(METHODS[m].needs_encoder for m in methods)
