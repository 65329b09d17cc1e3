"""Rating heads: the user's predicted rating beside the review, one config key ``model.rating_head``.

PETER, PEPLER and P5 report rating prediction (RMSE, MAE) next to the text metrics. Every head
combines with every conditioning method. ``D`` is the decoder width, ``E`` the encoder width,
``U``/``I`` the user/item table sizes, ``h`` ``model.rating_hidden_size`` and ``n``
``model.rating_layers``:

=========  ==========================================================  =========================
head       reads                                                       parameters
=========  ==========================================================  =========================
none       nothing: the training split's mean rating for everyone      0
mf         PEPLER's MF: dot product of a user and an item vector       ``(U + I) * D``, 0 with
                                                                       ``id_prompt``
mlp        PEPLER's MLP on [user vector, item vector]                  ``(U + I) * D`` (0 with
                                                                       ``id_prompt``) + MLP(2D)
encoder    MLP on the pooled encoder output (the review histories,     MLP(E)
           so it also rates users and items unseen in training)
decoder    PETER's idea: MLP on the decoder's last hidden state at     MLP(D)
           the BOS position (after every prefix vector, before the
           first target token, so it never sees the review it rates)
=========  ==========================================================  =========================

MLP(k) is ``n`` sigmoid layers of width ``h`` and a linear output: ``k*h + h + (n-1)*(h*h + h)
+ h + 1`` parameters. PEPLER's MLP has a first layer and ``num_layers=2`` more, all sigmoid and
400 wide, so ``h=400, n=3`` reproduces it; like PEPLER, weights start uniform in [-0.1, 0.1]
and biases at 0.

With ``id_prompt`` the user and item vectors of ``mf``/``mlp`` are the prompt's own embeddings
(as in PEPLER, where the rating and the text train the same tables); otherwise the head owns
its tables. Every head adds the training split's mean rating (``offset``, a constant of the
data, not a parameter) to its output, so a head starts at the baseline it must beat instead
of at 0 (PEPLER starts at 0 and trains for many epochs). Rating parameters sit under
``params["rating"]``, in the ``conditioning`` group: freezing regimes and PEPLER's two
stages treat them as the conditioning they belong with (stage 1, ``train.stage1_trainable =
("conditioning",)``, trains the prompt and the head together with the decoder frozen).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.conditioning import POOLINGS, pool


@dataclasses.dataclass(frozen=True)
class RatingSources:
    """What a head may read (each None when the generator has no such input).

    ``user``/``item`` ``[batch]`` int ids (0 = unseen in training); ``id_vectors`` the
    ``id_prompt`` embeddings of those ids, ``([batch, D], [batch, D])``; ``encoder_states``
    ``[batch, enc_len, E]`` with ``encoder_mask`` ``[batch, enc_len]``; ``decoder_state``
    ``[batch, D]`` (the decoder's final hidden state at the BOS position).
    """

    user: jax.Array | None = None
    item: jax.Array | None = None
    id_vectors: tuple[jax.Array, jax.Array] | None = None
    encoder_states: jax.Array | None = None
    encoder_mask: jax.Array | None = None
    decoder_state: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class RatingHeadSpec:
    """A head's settings (hashable: part of the generator's spec)."""

    name: str = "none"
    hidden_size: int = 400
    layers: int = 3
    pooling: str = "mean"
    offset: float = 0.0  # the training split's mean rating

    def __post_init__(self):
        if self.name not in HEADS:
            raise ValueError(f"model.rating_head={self.name!r}: valid choices are {list(HEADS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"rating head pooling={self.pooling!r}: valid {list(POOLINGS)}")

    @property
    def predicts(self) -> bool:
        """False for ``none`` (it has no parameters; evaluation predicts ``offset``)."""
        return self.name != "none"

    @property
    def reads_ids(self) -> bool:
        return HEADS[self.name].reads == "ids"

    @property
    def needs_encoder(self) -> bool:
        return HEADS[self.name].reads == "encoder"

    @property
    def needs_decoder_state(self) -> bool:
        return HEADS[self.name].reads == "decoder"


def _pepler_uniform(key, shape, dtype=jnp.float32):
    """PEPLER initialises its tables and MLP weights uniformly in [-0.1, 0.1]."""
    return jax.random.uniform(key, shape, dtype, -0.1, 0.1)


class SigmoidMLP(nn.Module):
    """``[batch, k]`` -> ``[batch]``: ``layers`` sigmoid layers of ``hidden_size``, then linear."""

    hidden_size: int
    layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        for i in range(self.layers):
            x = jax.nn.sigmoid(
                nn.Dense(self.hidden_size, kernel_init=_pepler_uniform, name=f"hidden_{i}")(x)
            )
        return nn.Dense(1, kernel_init=_pepler_uniform, name="out")(x)[:, 0]


class RatingHead(nn.Module):
    """Base: ``__call__(sources) -> [batch]`` predicted ratings (unclamped)."""

    spec: RatingHeadSpec
    d_model: int
    num_users: int
    num_items: int
    reads: ClassVar[str] = ""  # "ids", "encoder" or "decoder"

    def id_vectors(self, sources: RatingSources) -> tuple[jax.Array, jax.Array]:
        """The prompt's vectors when ``id_prompt`` shares them, else this head's own tables."""
        if sources.id_vectors is not None:
            return sources.id_vectors
        user = nn.Embed(self.num_users, self.d_model, embedding_init=_pepler_uniform, name="user")
        item = nn.Embed(self.num_items, self.d_model, embedding_init=_pepler_uniform, name="item")
        return user(sources.user), item(sources.item)

    def mlp(self, x: jax.Array) -> jax.Array:
        return SigmoidMLP(self.spec.hidden_size, self.spec.layers, name="mlp")(x)


class NoRating(RatingHead):
    """``none``: no head; the evaluation predicts the training mean (the baseline)."""

    def __call__(self, sources: RatingSources) -> jax.Array | None:
        return None


class MatrixFactorisation(RatingHead):
    """``mf``: ``offset + <user vector, item vector>`` (PEPLER's MF plus the offset)."""

    reads: ClassVar[str] = "ids"

    @nn.compact
    def __call__(self, sources: RatingSources) -> jax.Array:
        user, item = self.id_vectors(sources)
        return self.spec.offset + (user.astype(jnp.float32) * item.astype(jnp.float32)).sum(-1)


class IdMLP(RatingHead):
    """``mlp``: ``offset + MLP([user vector, item vector])`` (PEPLER's MLP plus the offset)."""

    reads: ClassVar[str] = "ids"

    @nn.compact
    def __call__(self, sources: RatingSources) -> jax.Array:
        user, item = self.id_vectors(sources)
        return self.spec.offset + self.mlp(jnp.concatenate([user, item], axis=-1))


class EncoderMLP(RatingHead):
    """``encoder``: ``offset + MLP(pooled encoder output)``."""

    reads: ClassVar[str] = "encoder"

    @nn.compact
    def __call__(self, sources: RatingSources) -> jax.Array:
        pooled = pool(sources.encoder_states, sources.encoder_mask, self.spec.pooling)
        return self.spec.offset + self.mlp(pooled)


class DecoderMLP(RatingHead):
    """``decoder``: ``offset + MLP(decoder hidden state at the BOS position)``."""

    reads: ClassVar[str] = "decoder"

    @nn.compact
    def __call__(self, sources: RatingSources) -> jax.Array:
        return self.spec.offset + self.mlp(sources.decoder_state)


HEADS: dict[str, type[RatingHead]] = {
    "none": NoRating,
    "mf": MatrixFactorisation,
    "mlp": IdMLP,
    "encoder": EncoderMLP,
    "decoder": DecoderMLP,
}


def make_head(spec: RatingHeadSpec, d_model: int, num_users: int, num_items: int) -> RatingHead:
    return HEADS[spec.name](spec, d_model, num_users, num_items)


def head_reads_text(spec: RatingHeadSpec, conditioning_reads_encoder: bool) -> bool:
    """Whether the head can rate from a conditioning text alone (``research generate --text``)."""
    return spec.needs_encoder or (spec.needs_decoder_state and conditioning_reads_encoder)
