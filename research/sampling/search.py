"""The decoding loops: greedy or sampled (one hypothesis per row) and beam search."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from research.models.decode_weights import DecodeWeights
from research.models.generator import Generator
from research.sampling.processors import constrain, warp
from research.sampling.settings import SamplingConfig
from research.sampling.steps import DecodeState, decode_step, prefill

# Hugging Face's stand-in for "impossible" in beam scores (kept, so ties break as there).
_NEG = -1.0e9


def first_argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax`` over the last axis (the first maximum, or the first NaN if any) from
    plain reductions, which XLA:CPU runs ~4x faster than argmax's (value, index) reduction
    over a vocabulary (experiments/bench/README.md, generate)."""
    size = logits.shape[-1]
    index = jnp.arange(size, dtype=jnp.int32)
    first_nan = jnp.min(jnp.where(jnp.isnan(logits), index, size), axis=-1)
    top = logits.max(axis=-1, keepdims=True)
    first_max = jnp.min(jnp.where(logits == top, index, size), axis=-1)
    return jnp.where(first_nan < size, first_nan, first_max)


def decode_one_per_row(
    model: Generator,
    weights: DecodeWeights,
    cfg: SamplingConfig,
    batch: Mapping[str, jax.Array],
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    example: jax.Array,
    seed: jax.Array,
) -> jax.Array:
    """Greedy or sampled decoding -> tokens ``[batch, max_new_tokens]``, pad after EOS.

    ``example`` ``[batch]`` and ``seed`` (int32 ``[]``) pick each row's random stream.
    """
    _, eos, pad = model.spec.decoder_family.special_ids(model.spec.decoder)
    new = cfg.max_new_tokens
    logits, state = prefill(model, weights, batch, prompt_ids, prompt_mask, new)
    base_key = jax.random.key(seed)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(base_key, jnp.maximum(example, 0))

    def choose(logits, t, tokens, finished):
        logits = constrain(logits, cfg, eos, prompt_ids, prompt_mask, tokens, t)
        if cfg.strategy == "sample":
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)
            choice = jax.vmap(jax.random.categorical)(step_keys, warp(logits, cfg))
        else:
            choice = first_argmax(logits)
        choice = jnp.where(finished, pad, choice).astype(jnp.int32)
        return tokens.at[:, t].set(choice), finished | (choice == eos)

    # Padding rows (example -1) start finished, so they never keep the loop running.
    tokens = jnp.full((prompt_ids.shape[0], new), pad, jnp.int32)
    tokens, finished = choose(logits, 0, tokens, example < 0)

    def running(carry):
        t, _, finished, _ = carry
        return (t < new) & ~finished.all()

    def step(carry):
        t, tokens, finished, state = carry
        logits, state = decode_step(model, weights, state, tokens[:, t - 1])
        tokens, finished = choose(logits, t, tokens, finished)
        return t + 1, tokens, finished, state

    _, tokens, _, _ = jax.lax.while_loop(running, step, (jnp.int32(1), tokens, finished, state))
    return tokens


class _Beams(NamedTuple):
    """Beam search state, ``[batch, beams, ...]`` (Hugging Face's names in comments)."""

    t: jax.Array  # int32 []: new tokens so far (cur_len - decoder_prompt_len)
    running: jax.Array  # [batch, beams, max_new] running_sequences (new part)
    running_scores: jax.Array  # [batch, beams] running_beam_scores: summed log-probs
    finished: jax.Array  # [batch, beams, max_new] sequences
    finished_scores: jax.Array  # [batch, beams] beam_scores (length-penalised)
    is_finished: jax.Array  # [batch, beams] is_sent_finished
    improvable: jax.Array  # [batch] is_early_stop_heuristic_unsatisfied
    state: DecodeState  # rows batch * beams, row b * beams + k


def _gather_beams(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[b, index[b, j], ...]`` for ``x`` ``[batch, n, ...]``, ``index`` ``[batch, m]``."""
    return x[jnp.arange(x.shape[0])[:, None], index]


def decode_beam(
    model: Generator,
    weights: DecodeWeights,
    cfg: SamplingConfig,
    batch: Mapping[str, jax.Array],
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    example: jax.Array,
) -> jax.Array:
    """Hugging Face's beam search -> best finished hypothesis ``[batch, max_new_tokens]``."""
    family = model.spec.decoder_family
    _, eos, pad = family.special_ids(model.spec.decoder)
    beams, new, penalty = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    rows = prompt_ids.shape[0]
    logits, state = prefill(model, weights, batch, prompt_ids, prompt_mask, new)
    # Every beam of a row starts from the same prefill: repeat its rows instead of recomputing.
    repeat = functools.partial(jnp.repeat, repeats=beams, axis=0)
    state = DecodeState(
        jax.tree.map(repeat, state.cache),
        repeat(state.mask),
        jax.tree.map(repeat, state.inputs),
        state.index,
    )
    prompt_ids, prompt_mask = repeat(prompt_ids), repeat(prompt_mask)
    candidates = 2 * beams  # beams_to_keep: enough to keep `beams` running past EOS choices
    is_top = jnp.arange(candidates) < beams  # top_num_beam_mask

    def choose(logits, c: _Beams) -> _Beams:
        t = c.t
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        generated = c.running.reshape(rows * beams, new)
        log_probs = constrain(log_probs, cfg, eos, prompt_ids, prompt_mask, generated, t)
        vocab = log_probs.shape[-1]
        totals = log_probs.reshape(rows, beams, vocab) + c.running_scores[:, :, None]
        top_scores, top_index = jax.lax.top_k(totals.reshape(rows, beams * vocab), candidates)
        source, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        sequences = _gather_beams(c.running, source).at[:, :, t].set(token)
        done = (token == eos) | (t + 1 >= new)  # next_token_hits_stopping_criteria

        # The best `beams` candidates that did not just end keep running.
        running_scores = top_scores + jnp.where(done, _NEG, 0.0)
        keep = jax.lax.top_k(running_scores, beams)[1]
        kept_scores = _gather_beams(running_scores, keep)
        rows_from = (jnp.arange(rows)[:, None] * beams + _gather_beams(source, keep)).reshape(-1)
        cache = family.reorder_cache(c.state.cache, rows_from)
        state = dataclasses.replace(c.state, cache=cache)

        # Candidates that just ended (among the top `beams` only) compete with the finished ones.
        just_finished = done & is_top[None, :]
        scores = top_scores / (t + 1).astype(jnp.float32) ** penalty
        scores = scores + jnp.where(c.improvable, 0.0, _NEG)[:, None]
        scores = scores + jnp.where(just_finished, 0.0, _NEG)
        best = jax.lax.top_k(jnp.concatenate([c.finished_scores, scores], 1), beams)[1]
        finished = _gather_beams(jnp.concatenate([c.finished, sequences], 1), best)
        finished_scores = _gather_beams(jnp.concatenate([c.finished_scores, scores], 1), best)
        is_finished = _gather_beams(jnp.concatenate([c.is_finished, just_finished], 1), best)

        # Hugging Face's early_stopping=False heuristic: stop once the best running beam, scored
        # at its current length, cannot beat the worst of `beams` finished hypotheses.
        best_running = kept_scores[:, 0] / (t + 1).astype(jnp.float32) ** penalty
        worst_finished = jnp.where(is_finished, finished_scores.min(1, keepdims=True), _NEG)
        improvable = c.improvable & (best_running[:, None] > worst_finished).any(1)
        return _Beams(
            t + 1,
            _gather_beams(sequences, keep),
            kept_scores,
            finished,
            finished_scores,
            is_finished,
            improvable,
            state,
        )

    start = _Beams(
        t=jnp.int32(0),
        running=jnp.full((rows, beams, new), pad, jnp.int32),
        # Only beam 0 is live at first, so the beams do not start as copies of each other.
        running_scores=jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, _NEG), (rows, 1)),
        finished=jnp.full((rows, beams, new), pad, jnp.int32),
        finished_scores=jnp.full((rows, beams), _NEG),
        is_finished=jnp.zeros((rows, beams), bool),
        improvable=example >= 0,  # padding rows take no part
        state=state,
    )
    beam_state = choose(repeat(logits), start)

    def running(c: _Beams):
        return (c.t < new) & c.improvable.any()

    def step(c: _Beams) -> _Beams:
        last = c.running[:, :, c.t - 1].reshape(-1)
        logits, state = decode_step(model, weights, c.state, last)
        return choose(logits, c._replace(state=state))

    return jax.lax.while_loop(running, step, beam_state).finished[:, 0]
