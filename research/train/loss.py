"""The training objective's parts: next-token loss on target tokens, squared rating error.

The generator's logits cover the decoder tokens (soft-prompt positions are already dropped),
so the only positions to exclude are padding and the BOS that nothing predicts. Both parts
return sums and counts, never means, so that devices and accumulation steps add them exactly;
the objective is ``text_weight * text_sum / tokens + rating_weight * rating_sum / rated`` over
the whole global batch (PEPLER's ``text_reg`` and ``rating_reg``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def target_weights(decoder_mask: jax.Array) -> jax.Array:
    """float32 ``[..., T]``: 1 where position ``t`` predicts a real token ``t + 1``, else 0."""
    return jnp.roll(decoder_mask, -1, axis=-1).astype(jnp.float32).at[..., -1].set(0.0)


def token_loss_sums(
    logits: jax.Array, decoder_ids: jax.Array, decoder_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy and the number of target tokens it covers.

    Args:
      logits: ``[batch, T, vocab]``; position ``t`` predicts token ``t + 1``.
      decoder_ids, decoder_mask: ``[batch, T]``.

    Returns sums (not means) so that devices and accumulation steps can add them exactly.
    """
    # Targets shifted left, the last position weighted 0 (nothing follows it): the logits are
    # used whole. Slicing off their last position copied [batch, T - 1, vocab] forward and
    # padded the gradient back to [batch, T, vocab] (GPT-2 124M, batch 8 x 128: 193 MiB more
    # temporary memory, 1.2 GB more memory traffic per step).
    targets = jnp.roll(decoder_ids, -1, axis=1)
    weights = target_weights(decoder_mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return (ce * weights).sum(), weights.sum()


def rating_loss_sums(
    predicted: jax.Array, rating: jax.Array, rating_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed squared rating error over rated examples, and how many there are.

    Args:
      predicted: ``[batch]`` predicted ratings (unclamped: clamping is for evaluation only).
      rating, rating_mask: ``[batch]`` true ratings and 1 where the example has one.

    Per example, not per token: a long review weighs as much as a short one.
    """
    weights = rating_mask.astype(jnp.float32)
    error = predicted.astype(jnp.float32) - rating.astype(jnp.float32)
    return (weights * error**2).sum(), weights.sum()


def mean_token_loss(logits, decoder_ids, decoder_mask) -> jax.Array:
    total, count = token_loss_sums(logits, decoder_ids, decoder_mask)
    return total / jnp.maximum(count, 1.0)


def perplexity(mean_loss: jax.Array) -> jax.Array:
    return jnp.exp(mean_loss)
