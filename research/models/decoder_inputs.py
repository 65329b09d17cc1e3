"""What conditioning hands a decoder: one pytree whose fields say how they combine and when
they are read.

Each field declares two things in its metadata:

* ``combine``: how two methods' values merge when methods are combined with ``+``
  (``concat`` along the sequence axis, ``sum``, or ``first`` = the first one set);
* ``per_step``: whether every decoding step reads it again. Fields that are not per-step are
  consumed by the prefill call and live in the KV cache from then on (the prefix as cached
  keys/values, the encoder states as cached cross-attention keys/values).

A conditioning method that needs a new decoder hook adds one field here; training, prefill
and decoding steps all pass the object whole, so no field can be forgotten on one path.

The decoder side of the contract is here too: :func:`decoder_entry` (the embeddings and masks
every family's ``__call__`` starts from) and :func:`cross_attention_kv`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


def _concat(a, b):
    return b if a is None else a if b is None else jnp.concatenate([a, b], axis=1)


def _sum(a, b):
    return b if a is None else a if b is None else a + b


def _first(a, b):
    return a if a is not None else b


_COMBINE: dict[str, Callable] = {"concat": _concat, "sum": _sum, "first": _first}


def _hook(combine: str, per_step: bool):
    return dataclasses.field(default=None, metadata={"combine": combine, "per_step": per_step})


@dataclasses.dataclass
class DecoderInputs:
    """The decoder's conditioning hooks (all optional)."""

    prefix_embeds: jax.Array | None = _hook("concat", per_step=False)  # [batch, prefix, D]
    embed_offset: jax.Array | None = _hook("sum", per_step=True)  # [batch, D]
    encoder_states: jax.Array | None = _hook("first", per_step=False)  # [batch, enc_len, E]
    encoder_mask: jax.Array | None = _hook("first", per_step=True)  # [batch, enc_len]

    def merge(self, other: DecoderInputs) -> DecoderInputs:
        return DecoderInputs(
            **{
                f.name: _COMBINE[f.metadata["combine"]](
                    getattr(self, f.name), getattr(other, f.name)
                )
                for f in dataclasses.fields(self)
            }
        )

    def for_steps(self) -> DecoderInputs:
        """Only the fields every decoding step re-reads (the rest is in the cache)."""
        return DecoderInputs(
            **{
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.metadata["per_step"]
            }
        )

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_embeds is None else self.prefix_embeds.shape[1]


jax.tree_util.register_dataclass(
    DecoderInputs,
    data_fields=[f.name for f in dataclasses.fields(DecoderInputs)],
    meta_fields=[],
)


class DecoderEntry(NamedTuple):
    """What a decoder's first block reads (see :func:`decoder_entry`)."""

    x: jax.Array  # [batch, prefix + seq, D]: the prefix, then the token embeddings (+ offset)
    key_valid: jax.Array  # [batch, keys]: 1 where a key exists (this call's, or every slot)
    key_positions: jax.Array  # [batch, keys]: each key's position; padding takes none
    position_ids: jax.Array  # [batch, prefix + seq]: the queries' positions


def decoder_entry(
    token_embeds: jax.Array,
    attention_mask: jax.Array | None,
    inputs: DecoderInputs,
    n_slots: int | None = None,
    cache_index: jax.Array | int = 0,
    position_ids: jax.Array | None = None,
) -> DecoderEntry:
    """Place the hooks around the token embeddings ``[batch, seq, D]``: ``embed_offset`` is
    added to every token (not the prefix), ``prefix_embeds`` go first.

    ``attention_mask`` is ``[batch, seq]`` without a cache (``n_slots`` None), and covers every
    cache slot (``[batch, n_slots]``) with one, prefix slots included; None means all valid.
    Positions follow the mask's running count unless ``position_ids`` are given, so the first
    token after a ``P``-vector prefix sits at position ``P`` and padding takes no position.
    """
    batch, seq, _ = token_embeds.shape
    x = token_embeds
    if inputs.embed_offset is not None:
        x = x + inputs.embed_offset[:, None, :].astype(x.dtype)
    if attention_mask is None:
        attention_mask = jnp.ones((batch, seq if n_slots is None else n_slots), jnp.int32)
    key_valid = attention_mask
    if inputs.prefix_embeds is not None:
        x = jnp.concatenate([inputs.prefix_embeds.astype(x.dtype), x], axis=1)
        if n_slots is None:
            prefix_valid = jnp.ones(inputs.prefix_embeds.shape[:2], key_valid.dtype)
            key_valid = jnp.concatenate([prefix_valid, key_valid], axis=1)
    key_positions = jnp.maximum(jnp.cumsum(key_valid, axis=1) - 1, 0)
    if position_ids is None:
        start = 0 if n_slots is None else cache_index
        position_ids = jax.lax.dynamic_slice_in_dim(key_positions, start, x.shape[1], axis=1)
    return DecoderEntry(x, key_valid, key_positions, position_ids)


def has_cross_attention(cross_attention_every: int, layer_idx: int) -> bool:
    """Whether block ``layer_idx`` has a cross-attention sublayer: with
    ``cross_attention_every=n``, blocks ``n-1, 2n-1, ...`` (0: none)."""
    n = cross_attention_every
    return n > 0 and layer_idx % n == n - 1


def cross_attention_kv(
    blocks: Sequence[Any],
    cross_attention_every: int,
    inputs: DecoderInputs,
    cache: dict[str, Any] | None,
) -> list | None:
    """Per block, the encoder keys/values its cross-attention reads (None for blocks without
    one), or None for a decoder without cross-attention. Computed once from
    ``inputs.encoder_states`` (training, prefill), then read from ``cache["cross"]``."""
    if cache is not None and cache["cross"] is not None:
        return cache["cross"]
    if cross_attention_every == 0:
        return None
    if inputs.encoder_states is None or inputs.encoder_mask is None:
        raise ValueError("cross-attention blocks need encoder_states and encoder_mask")
    return [
        block.encoder_kv(inputs.encoder_states)
        if has_cross_attention(cross_attention_every, i)
        else None
        for i, block in enumerate(blocks)
    ]
