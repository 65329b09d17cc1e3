"""Prefill and single decoding steps over a preallocated KV cache (see the package docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from research.models import decode_weights
from research.models.decode_weights import DecodeWeights
from research.models.decoder_inputs import DecoderInputs
from research.models.generator import Generator


@dataclasses.dataclass
class DecodeState:
    """What a decoding step needs besides the new token (a pytree; arrays lead with batch)."""

    cache: Any  # from the decoder family's init_cache; slots [0, index) are filled
    mask: jax.Array  # [batch, max_len] 1 = a real key (prefix, prompt tokens, generated slots)
    inputs: DecoderInputs  # the fields every step re-reads (DecoderInputs.for_steps)
    index: jax.Array  # int32 []: the slot the next token goes to


jax.tree_util.register_dataclass(
    DecodeState, data_fields=["cache", "mask", "inputs", "index"], meta_fields=[]
)


def _apply(model: Generator, weights: DecodeWeights, *args, method, **kwargs) -> Any:
    """``model.apply`` with the decoder computing from its decoding weights."""
    with decode_weights.reading():
        return model.apply({"params": weights.params}, *args, method=method, **kwargs)


def prefill(
    model: Generator,
    weights: DecodeWeights,
    batch: Mapping[str, jax.Array],
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
) -> tuple[jax.Array, DecodeState]:
    """Condition on ``batch`` and run the prompt through the decoder once.

    Args:
      weights: the generator's parameters prepared by ``decode_weights.prepare``.
      batch: what the conditioning reads (``encoder_ids``/``encoder_mask`` ``[batch, S]``,
        ``user``/``item`` ``[batch]``).
      prompt_ids, prompt_mask: ``[batch, T]``, left padded (every row ends at column T-1).
      max_new_tokens: cache room for the tokens that follow.

    Returns the last prompt position's logits ``[batch, vocab]`` (they predict the first new
    token; the LM head runs over no other position) and the state whose cache holds the prefix
    and the prompt.
    """
    inputs = _apply(model, weights, dict(batch), method=Generator.condition)
    rows, prompt_len = prompt_ids.shape
    prefix_len = inputs.prefix_length
    max_len = prefix_len + prompt_len + max_new_tokens
    family, config = model.spec.decoder_family, model.spec.decoder
    if max_len > family.position_limit(config):
        raise ValueError(
            f"prefix ({prefix_len}) + padded prompt ({prompt_len}) + sampling.max_new_tokens "
            f"({max_new_tokens}) = {max_len} positions exceed the decoder's limit of "
            f"{family.position_limit(config)} positions"
        )
    mask = jnp.concatenate(
        [
            jnp.ones((rows, prefix_len), jnp.int32),
            prompt_mask.astype(jnp.int32),
            jnp.ones((rows, max_new_tokens), jnp.int32),
        ],
        axis=1,
    )
    cache = family.init_cache(config, rows, max_len, model.dtype)
    logits, cache = _apply(
        model, weights, prompt_ids, mask, inputs, cache, 0, method=Generator.decode, last_only=True
    )
    # The prefix now lives in the cache; the cross-attention keys/values too (cache["cross"]).
    state = DecodeState(
        cache, mask, inputs.for_steps(), jnp.asarray(prefix_len + prompt_len, jnp.int32)
    )
    return logits[:, -1], state


def decode_step(
    model: Generator, weights: DecodeWeights, state: DecodeState, tokens: jax.Array
) -> tuple[jax.Array, DecodeState]:
    """Feed one token per row (``[batch]``) -> next-token logits ``[batch, vocab]``, new state."""
    logits, cache = _apply(
        model,
        weights,
        tokens[:, None],
        state.mask,
        state.inputs,
        state.cache,
        state.index,
        method=Generator.decode,
    )
    return logits[:, -1], dataclasses.replace(state, cache=cache, index=state.index + 1)
