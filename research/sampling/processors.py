"""Logit processing: Hugging Face's hard constraints (processors) and warpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research.sampling.settings import SamplingConfig


def repeated_ngram_mask(
    history: jax.Array, valid: jax.Array, length: jax.Array | int, n: int, vocab_size: int
) -> jax.Array:
    """Which next tokens would repeat an n-gram of ``history[:, :length]`` -> ``[rows, vocab]``.

    Hugging Face's ``NoRepeatNGramLogitsProcessor`` over the real tokens only: ``valid``
    ``[rows, S]`` marks them in ``history`` ``[rows, S]`` (left padding is not text), and the
    next token goes to column ``length`` (the same for every row).
    """
    rows, width = history.shape
    banned = jnp.zeros((rows, vocab_size), jnp.int32)
    if n > width:
        return banned.astype(bool)
    starts = jnp.arange(width - n + 1)
    window = starts[:, None] + jnp.arange(n)[None, :]  # [windows, n] columns of each n-gram
    grams = history[:, window]  # [rows, windows, n]
    complete = valid[:, window].all(-1) & (starts + n <= length)[None, :]
    # The last n-1 tokens; when fewer exist, no complete n-gram exists either.
    context = jax.lax.dynamic_slice_in_dim(history, jnp.maximum(length - (n - 1), 0), n - 1, 1)
    hit = complete & (grams[:, :, : n - 1] == context[:, None, :]).all(-1)
    banned = banned.at[jnp.arange(rows)[:, None], grams[:, :, n - 1]].add(hit.astype(jnp.int32))
    return banned > 0


def repetition_penalized(
    logits: jax.Array, history: jax.Array, counted: jax.Array, penalty: float
) -> jax.Array:
    """Hugging Face's ``RepetitionPenaltyLogitsProcessor``: every token of ``history``
    ``[rows, S]`` where ``counted`` ``[rows, S]`` gets its logit divided by ``penalty`` when
    positive, multiplied when negative (``logits`` ``[rows, vocab]``)."""
    rows = jnp.arange(history.shape[0])[:, None]
    seen = jnp.zeros(logits.shape, jnp.int32).at[rows, history].add(counted.astype(jnp.int32))
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen > 0, penalized, logits)


def constrain(
    logits: jax.Array,
    cfg: SamplingConfig,
    eos_id: int,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    generated: jax.Array,
    new_tokens: jax.Array | int,
) -> jax.Array:
    """The repetition penalty, then ``-inf`` where the hard constraints forbid a token: EOS
    before ``min_new_tokens``, repeated n-grams (of the prompt's real tokens and the output).

    The penalty counts the prompt's real tokens and the output's first ``new_tokens`` tokens.
    (transformers counts every column of its input, so in a left-padded batch it also
    penalizes the pad id, often EOS; here padding is never text.)

    ``logits`` ``[rows, vocab]``; ``prompt_ids``/``prompt_mask`` ``[rows, T]`` left padded;
    ``generated`` ``[rows, max_new_tokens]`` of which the first ``new_tokens`` are set.
    """
    if cfg.repetition_penalty != 1.0:
        history = jnp.concatenate([prompt_ids, generated], axis=1)
        written = jnp.arange(generated.shape[1])[None, :] < new_tokens
        counted = jnp.concatenate(
            [prompt_mask.astype(bool), jnp.broadcast_to(written, generated.shape)], 1
        )
        logits = repetition_penalized(logits, history, counted, cfg.repetition_penalty)
    if cfg.min_new_tokens > 0:
        early = new_tokens < cfg.min_new_tokens
        logits = logits.at[:, eos_id].set(jnp.where(early, -jnp.inf, logits[:, eos_id]))
    if cfg.no_repeat_ngram_size > 0:
        history = jnp.concatenate([prompt_ids, generated], axis=1)
        valid = jnp.concatenate([prompt_mask.astype(bool), jnp.ones(generated.shape, bool)], 1)
        length = prompt_ids.shape[1] + new_tokens
        vocab = logits.shape[-1]
        banned = repeated_ngram_mask(history, valid, length, cfg.no_repeat_ngram_size, vocab)
        logits = jnp.where(banned, -jnp.inf, logits)
    return logits


def warp(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature, top-k, top-p as Hugging Face's warpers (ties at a cut-off are kept)."""
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        ranked = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_above = jnp.cumsum(probs, axis=-1) - probs
        # A token survives while the more likely tokens hold less than top_p of the mass.
        lowest_kept = jnp.where(mass_above < cfg.top_p, ranked, jnp.inf).min(-1, keepdims=True)
        logits = jnp.where(logits < lowest_kept, -jnp.inf, logits)
    return logits
