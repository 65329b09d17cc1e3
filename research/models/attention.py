"""Scaled dot-product attention and the masks GPT-2 and BERT share.

Shapes: queries ``[batch, q_len, heads, head_dim]``, keys/values ``[batch, kv_len, kv_heads,
head_dim]`` (``heads`` a multiple of ``kv_heads``: grouped-query attention), boolean masks
broadcastable to ``[batch, heads, q_len, kv_len]`` (True = attend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def padding_mask(key_valid: jax.Array) -> jax.Array:
    """``[batch, kv_len]`` 0/1 validity -> boolean mask ``[batch, 1, 1, kv_len]``."""
    return key_valid.astype(bool)[:, None, None, :]


def causal_mask(key_valid: jax.Array, q_len: int, q_offset: jax.Array | int = 0) -> jax.Array:
    """Causal + padding mask ``[batch, 1, q_len, kv_len]``.

    Query ``t`` sits at absolute position ``q_offset + t`` (non-zero while decoding from a
    KV cache) and may attend to every valid key at a position ``<=`` its own.
    """
    kv_len = key_valid.shape[-1]
    q_pos = q_offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    return (k_pos <= q_pos)[None, None] & padding_mask(key_valid)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Softmax attention, ``[batch, q_len, heads, head_dim]``; softmax always in float32.

    Without dropout this is ``jax.nn.dot_product_attention`` (which can pick a fused kernel,
    e.g. ``implementation="cudnn"`` on GPUs). That API has no attention dropout, so training
    with ``attn_pdrop > 0`` takes the explicit einsum path; both compute the same function.
    """
    if dropout_rng is None or dropout_rate == 0.0:
        if implementation == "cudnn":
            # cuDNN takes the mask as a bias spanning every query: [batch, 1, q_len, kv_len].
            mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, implementation=implementation
        )
    if k.shape[2] != q.shape[2]:  # grouped-query attention: each key/value head serves a group
        k, v = (jnp.repeat(t, q.shape[2] // t.shape[2], axis=2) for t in (k, v))
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)
