"""Fast decoding: prefill once, then one token per step from a preallocated KV cache.

The cache of a batch has one slot per position the decoder will ever see::

    [ soft prefix (P) | prompt, left padded (T) | generated tokens (max_new_tokens) ]

:func:`prefill` runs the conditioning (encoder, prefix, id prompt, cross-attention keys and
values) and the prompt through the model once; :func:`decode_step` feeds one token per row
into the next slot. The decoding loop is a ``lax.while_loop`` that stops as soon as every row
is finished, so a batch costs one prefill plus (longest output) single-token steps.

Strategies (``SamplingConfig.strategy``):

* ``greedy``: argmax; Hugging Face's ``generate(do_sample=False)`` token for token.
* ``sample``: temperature, then top-k, then top-p (Hugging Face's warpers), then a draw.
  Row ``r`` draws step ``t`` with ``fold_in(fold_in(key(seed), example[r]), t)``, so a
  sample depends on the seed and the example only, not on its batch or device.
* ``beam``: Hugging Face's beam search (transformers 5, ``early_stopping=False``): scores are
  summed log-probabilities, a finished hypothesis scores ``sum / new_tokens ** length_penalty``
  and the best finished one is returned.

All strategies share Hugging Face's hard constraints: no EOS before ``min_new_tokens`` and
``no_repeat_ngram_size`` (an n-gram of the prompt's real tokens plus the output never repeats).
A row ends at its EOS; the slots after it hold the pad id (= EOS, GPT-2's convention).

:func:`generate_batches` shards batches over local devices (``shard_map``: each device runs its
own loop, so one slow row holds back only its device), pads a short last batch and drops the
padding rows. The compiled function is cached per (model, settings, devices) and jit reuses
it for every batch of the same shapes; ``TRACES`` counts the traces so tests can check that.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from research.models.conditioning import DecoderInputs
from research.models.generator import Generator
from research.models.gpt2 import init_cache

SAMPLING_CHOICES: dict[str, tuple] = {"strategy": ("greedy", "sample", "beam")}

# Hugging Face's stand-in for "impossible" in beam scores (kept, so ties break as there).
_NEG = -1.0e9
# Batch keys the decoding reads; the reference targets (decoder_ids) are not among them, so
# their length bucket never causes a recompilation.
_CONDITIONING_KEYS = ("encoder_ids", "encoder_mask", "user", "item")

# How many times the decoding of each strategy was traced (compiled); see the module docstring.
TRACES: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; the central config holds them as ``sampling.<field>``."""

    strategy: str = "greedy"
    temperature: float = 1.0  # sample: logits are divided by it
    top_k: int = 0  # sample: keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # sample: keep the most likely tokens holding top_p of the mass (1 = off)
    num_beams: int = 4  # beam
    length_penalty: float = 1.0  # beam: finished score = sum logprob / new_tokens ** this
    no_repeat_ngram_size: int = 0  # 0 = off
    min_new_tokens: int = 0  # EOS is forbidden before this many new tokens
    max_new_tokens: int = 20  # PEPLER decodes 20 tokens
    seed: int = 0  # sample
    batch_size: int = 64  # rows per compiled call (rounded up to a multiple of the devices)

    def __post_init__(self):
        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"sampling.{key}={getattr(self, key)!r}: {rule}")

        if self.strategy not in SAMPLING_CHOICES["strategy"]:
            raise bad("strategy", f"choose one of {', '.join(SAMPLING_CHOICES['strategy'])}")
        if not self.temperature > 0:
            raise bad("temperature", "must be > 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        for key in ("top_k", "no_repeat_ngram_size", "min_new_tokens", "seed"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        for key in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens", f"exceeds sampling.max_new_tokens={self.max_new_tokens}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> SamplingConfig:
        """From the ``sampling`` ConfigDict (or a dict); unknown keys are an error."""
        values = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"sampling.{unknown[0]} is not a setting; valid: {sorted(fields)}")
        return cls(**values)


def sampling_config() -> ml_collections.ConfigDict:
    """The defaults of :class:`SamplingConfig` as a ConfigDict (for ``--config.sampling.x=y``)."""
    return ml_collections.ConfigDict(dataclasses.asdict(SamplingConfig()))


def _as_sampling_config(cfg) -> SamplingConfig:
    return cfg if isinstance(cfg, SamplingConfig) else SamplingConfig.from_config(cfg)


# --- Prefill and single steps ---------------------------------------------------------------


@dataclasses.dataclass
class DecodeState:
    """What a decoding step needs besides the new token (a pytree; arrays lead with batch)."""

    cache: dict[str, Any]  # from init_cache; slots [0, index) are filled
    mask: jax.Array  # [batch, max_len] 1 = a real key (prefix, prompt tokens, generated slots)
    inputs: DecoderInputs  # what every step re-reads: embed_offset, encoder_mask (no prefix)
    index: jax.Array  # int32 []: the slot the next token goes to


jax.tree_util.register_dataclass(
    DecodeState, data_fields=["cache", "mask", "inputs", "index"], meta_fields=[]
)


def prefill(
    model: Generator,
    params: dict[str, Any],
    batch: Mapping[str, jax.Array],
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
) -> tuple[jax.Array, DecodeState]:
    """Condition on ``batch`` and run the prompt through the decoder once.

    Args:
      batch: what the conditioning reads (``encoder_ids``/``encoder_mask`` ``[batch, S]``,
        ``user``/``item`` ``[batch]``).
      prompt_ids, prompt_mask: ``[batch, T]``, left padded (every row ends at column T-1).
      max_new_tokens: cache room for the tokens that follow.

    Returns logits over the prompt positions ``[batch, T, vocab]`` (the last one predicts the
    first new token) and the state whose cache holds the prefix and the prompt.
    """
    variables = {"params": params}
    inputs = model.apply(variables, dict(batch), method=Generator.condition)
    rows, prompt_len = prompt_ids.shape
    prefix_len = inputs.prefix_length
    max_len = prefix_len + prompt_len + max_new_tokens
    if max_len > model.spec.decoder.n_positions:
        raise ValueError(
            f"prefix ({prefix_len}) + padded prompt ({prompt_len}) + sampling.max_new_tokens "
            f"({max_new_tokens}) = {max_len} positions exceed the decoder's n_positions="
            f"{model.spec.decoder.n_positions}"
        )
    mask = jnp.concatenate(
        [
            jnp.ones((rows, prefix_len), jnp.int32),
            prompt_mask.astype(jnp.int32),
            jnp.ones((rows, max_new_tokens), jnp.int32),
        ],
        axis=1,
    )
    cache = init_cache(model.spec.decoder, rows, max_len, model.dtype)
    logits, cache = model.apply(
        variables, prompt_ids, mask, inputs, cache, 0, method=Generator.decode
    )
    # The prefix now lives in the cache; the cross-attention keys/values too (cache["cross"]).
    step_inputs = DecoderInputs(embed_offset=inputs.embed_offset, encoder_mask=inputs.encoder_mask)
    state = DecodeState(cache, mask, step_inputs, jnp.asarray(prefix_len + prompt_len, jnp.int32))
    return logits[:, prefix_len:], state


def decode_step(
    model: Generator, params: dict[str, Any], state: DecodeState, tokens: jax.Array
) -> tuple[jax.Array, DecodeState]:
    """Feed one token per row (``[batch]``) -> next-token logits ``[batch, vocab]``, new state."""
    logits, cache = model.apply(
        {"params": params},
        tokens[:, None],
        state.mask,
        state.inputs,
        state.cache,
        state.index,
        method=Generator.decode,
    )
    return logits[:, -1], dataclasses.replace(state, cache=cache, index=state.index + 1)


# --- Logit processing (Hugging Face's processors and warpers) ----------------------------------


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


def constrain(
    logits: jax.Array,
    cfg: SamplingConfig,
    eos_id: int,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    generated: jax.Array,
    new_tokens: jax.Array | int,
) -> jax.Array:
    """``-inf`` where the hard constraints forbid a token: EOS before ``min_new_tokens``,
    repeated n-grams (of the prompt's real tokens and the output).

    ``logits`` ``[rows, vocab]``; ``prompt_ids``/``prompt_mask`` ``[rows, T]`` left padded;
    ``generated`` ``[rows, max_new_tokens]`` of which the first ``new_tokens`` are set.
    """
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


# --- Decoding loops ---------------------------------------------------------------------------


def _decode_one_per_row(
    model: Generator,
    params: dict[str, Any],
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
    eos = pad = model.spec.decoder.eos_token_id
    new = cfg.max_new_tokens
    logits, state = prefill(model, params, batch, prompt_ids, prompt_mask, new)
    base_key = jax.random.key(seed)
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(base_key, jnp.maximum(example, 0))

    def choose(logits, t, tokens, finished):
        logits = constrain(logits, cfg, eos, prompt_ids, prompt_mask, tokens, t)
        if cfg.strategy == "sample":
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, t)
            choice = jax.vmap(jax.random.categorical)(step_keys, warp(logits, cfg))
        else:
            choice = jnp.argmax(logits, axis=-1)
        choice = jnp.where(finished, pad, choice).astype(jnp.int32)
        return tokens.at[:, t].set(choice), finished | (choice == eos)

    # Padding rows (example -1) start finished, so they never keep the loop running.
    tokens = jnp.full((prompt_ids.shape[0], new), pad, jnp.int32)
    tokens, finished = choose(logits[:, -1], 0, tokens, example < 0)

    def running(carry):
        t, _, finished, _ = carry
        return (t < new) & ~finished.all()

    def step(carry):
        t, tokens, finished, state = carry
        logits, state = decode_step(model, params, state, tokens[:, t - 1])
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


def _decode_beam(
    model: Generator,
    params: dict[str, Any],
    cfg: SamplingConfig,
    batch: Mapping[str, jax.Array],
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    example: jax.Array,
) -> jax.Array:
    """Hugging Face's beam search -> best finished hypothesis ``[batch, max_new_tokens]``."""
    eos = pad = model.spec.decoder.eos_token_id
    beams, new, penalty = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    rows = prompt_ids.shape[0]
    logits, state = prefill(model, params, batch, prompt_ids, prompt_mask, new)
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
        reordered = jax.tree.map(lambda x: x[rows_from], c.state.cache["self"])
        # Beams of a row share the encoder keys/values in cache["cross"]: nothing to reorder.
        state = dataclasses.replace(c.state, cache={**c.state.cache, "self": reordered})

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
    beam_state = choose(repeat(logits[:, -1]), start)

    def running(c: _Beams):
        return (c.t < new) & c.improvable.any()

    def step(c: _Beams) -> _Beams:
        last = c.running[:, :, c.t - 1].reshape(-1)
        logits, state = decode_step(model, params, c.state, last)
        return choose(logits, c._replace(state=state))

    return jax.lax.while_loop(running, step, beam_state).finished[:, 0]


# --- Batches over devices ---------------------------------------------------------------------


def _generate_rows(
    model: Generator,
    cfg: SamplingConfig,
    params: dict[str, Any],
    rows: dict[str, jax.Array],
    seed: jax.Array,
) -> jax.Array:
    """One device's rows -> tokens ``[rows, max_new_tokens]``; see :func:`_device_inputs`."""
    TRACES[cfg.strategy] += 1
    batch = {k: rows[k] for k in _CONDITIONING_KEYS if k in rows}
    args = (model, params, cfg, batch, rows["prompt_ids"], rows["prompt_mask"], rows["example"])
    if cfg.strategy == "beam":
        return _decode_beam(*args)  # draws nothing: the seed is unused
    return _decode_one_per_row(*args, seed)


@functools.lru_cache(maxsize=16)
def _compiled(model: Generator, cfg: SamplingConfig, devices: tuple[jax.Device, ...]):
    """The jitted, sharded decoding for one (model, settings, devices); jit adds one compiled
    version per input shape (rows, prompt bucket, encoder length bucket). The seed is an
    argument and ``batch_size`` only shapes the inputs: ``cfg`` must have them at 0 and 1."""
    mesh = Mesh(np.array(devices), ("batch",))
    sharded = jax.shard_map(
        functools.partial(_generate_rows, model, cfg),
        mesh=mesh,
        in_specs=(P(), P("batch"), P()),
        out_specs=P("batch"),
        # Each device loops on its own rows (its own trip count); no collectives inside.
        check_vma=False,
    )
    return jax.jit(sharded), mesh


def _bucket(length: int) -> int:
    """Prompt lengths are padded to a power of two, so few prompt shapes get compiled."""
    return 1 << max(length - 1, 0).bit_length()


def _device_inputs(
    batch: Mapping[str, Any], num_rows: int, bos_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    """The arrays decoding reads, ``num_rows`` rows (extra rows copy the last one, example -1).

    The prompt is ``prompt_ids``/``prompt_mask`` ``[batch, T]`` (left padded) when the batch
    has them, else BOS alone; it is left padded further to a power of two.
    """
    example = np.asarray(batch["example"], np.int32)
    size = len(example)
    if "prompt_ids" in batch:
        prompt_ids = np.asarray(batch["prompt_ids"], np.int32)
        prompt_mask = np.asarray(batch["prompt_mask"], bool)
        if prompt_mask.shape[1] and not prompt_mask[example >= 0, -1].all():
            raise ValueError("prompt_ids must be left padded: every prompt ends in column T-1")
    else:
        prompt_ids = np.full((size, 1), bos_id, np.int32)
        prompt_mask = np.ones((size, 1), bool)
    extra = _bucket(prompt_ids.shape[1]) - prompt_ids.shape[1]
    out = {
        "prompt_ids": np.pad(prompt_ids, ((0, 0), (extra, 0)), constant_values=pad_id),
        "prompt_mask": np.pad(prompt_mask, ((0, 0), (extra, 0))),
        "example": example,
        **{k: np.asarray(batch[k]) for k in _CONDITIONING_KEYS if k in batch},
    }
    fill = num_rows - size
    out = {k: np.concatenate([v, np.repeat(v[-1:], fill, axis=0)]) for k, v in out.items()}
    out["example"][size:] = -1
    return out


def _chunks(batch: Mapping[str, Any], size: int) -> Iterator[dict[str, np.ndarray]]:
    """A batch of any number of rows as pieces of at most ``size`` rows."""
    if "example" not in batch:
        raise KeyError("generation batches need 'example' [batch] (the row's example index)")
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    for start in range(0, len(arrays["example"]), size):
        yield {k: v[start : start + size] for k, v in arrays.items()}


class Generated(NamedTuple):
    """One example's output: the new tokens before EOS, and (with a tokenizer) their text,
    decoded without special tokens and stripped of surrounding whitespace."""

    example: int
    token_ids: list[int]
    text: str | None


def output_lengths(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """``[rows, max_new]`` tokens -> ``[rows]`` number of tokens before the first EOS."""
    is_eos = tokens == eos_id
    return np.where(is_eos.any(1), is_eos.argmax(1), tokens.shape[1])


class _Sharded:
    """Model + parameters placed on the devices once, callable on one batch at a time."""

    def __init__(self, model: Generator, params, cfg: SamplingConfig, devices):
        devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
        self.fn, mesh = _compiled(model, dataclasses.replace(cfg, seed=0, batch_size=1), devices)
        self.seed = jnp.int32(cfg.seed)
        self.params = jax.device_put(params, NamedSharding(mesh, P()))
        self.rows_sharding = NamedSharding(mesh, P("batch"))
        # A call's rows: batch_size rounded up so that every device gets the same number.
        self.num_rows = -(-cfg.batch_size // len(devices)) * len(devices)
        decoder = model.spec.decoder
        self.bos_id, self.eos_id = decoder.bos_token_id, decoder.eos_token_id

    def dispatch(self, chunk: Mapping[str, Any]) -> tuple[np.ndarray, jax.Array]:
        """Start decoding ``chunk`` (asynchronously) -> (its example ids, tokens on device)."""
        inputs = _device_inputs(chunk, self.num_rows, self.bos_id, self.eos_id)
        tokens = self.fn(self.params, jax.device_put(inputs, self.rows_sharding), self.seed)
        return inputs["example"], tokens


def generate(
    model: Generator,
    params: dict[str, Any],
    batch: Mapping[str, Any],
    cfg: SamplingConfig | Mapping[str, Any],
    devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
    """Decode one batch -> tokens ``[batch, max_new_tokens]`` (int32, pad id after EOS).

    ``batch`` holds ``example`` ``[batch]`` (-1 = padding row), the conditioning inputs and
    optionally ``prompt_ids``/``prompt_mask`` ``[batch, T]`` (left padded; default BOS).
    """
    cfg = _as_sampling_config(cfg)
    runner = _Sharded(model, params, cfg, devices)
    pieces = [np.asarray(runner.dispatch(chunk)[1]) for chunk in _chunks(batch, runner.num_rows)]
    return np.concatenate(pieces)[: len(np.asarray(batch["example"]))]


def generate_batches(
    model: Generator,
    params: dict[str, Any],
    batches: Iterable[Mapping[str, Any]],
    cfg: SamplingConfig | Mapping[str, Any],
    tokenizer: Any = None,
    devices: Sequence[jax.Device] | None = None,
) -> Iterator[Generated]:
    """Decode every real row (``example >= 0``) of ``batches``, sharded over ``devices``.

    Batches may have any number of rows: each is cut into calls of ``batch_size`` rows (a
    multiple of the device count), the last call padded and its padding dropped. One call is
    decoded while the host prepares the next. Yields :class:`Generated` in input order.
    """
    cfg = _as_sampling_config(cfg)
    runner = _Sharded(model, params, cfg, devices)

    def results(example: np.ndarray, tokens: jax.Array) -> Iterator[Generated]:
        tokens = np.asarray(tokens)
        for index, row, length in zip(
            example, tokens, output_lengths(tokens, runner.eos_id), strict=True
        ):
            if index < 0:
                continue
            ids = row[:length].tolist()
            text = None
            if tokenizer is not None:
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            yield Generated(int(index), ids, text)

    pending = None
    for batch in batches:
        for chunk in _chunks(batch, runner.num_rows):
            started = runner.dispatch(chunk)
            if pending is not None:
                yield from results(*pending)
            pending = started
    if pending is not None:
        yield from results(*pending)


def generate_for_split(
    model: Generator,
    params: dict[str, Any],
    split_batches: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    sampling_cfg: SamplingConfig | Mapping[str, Any],
    devices: Sequence[jax.Device] | None = None,
) -> Iterator[Generated]:
    """:func:`generate_batches` over an evaluation pass (e.g. ``EvalIterator``) with a
    progress bar over its batches; yields ``(example, token_ids, text)`` per example."""
    total = len(split_batches) if hasattr(split_batches, "__len__") else None
    progress = tqdm(split_batches, total=total, desc="generate", unit="batch")
    yield from generate_batches(model, params, progress, sampling_cfg, tokenizer, devices)
