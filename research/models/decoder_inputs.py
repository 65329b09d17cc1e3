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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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
