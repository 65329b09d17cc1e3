"""Decoding batches over devices: chunking, padding, sharding, compiled-function cache."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from research.models import decode_weights
from research.models.decode_weights import DecodeWeights
from research.models.generator import Generator
from research.progress import track
from research.sampling.search import decode_beam, decode_one_per_row
from research.sampling.settings import SamplingConfig, as_sampling_config


def _generate_rows(
    model: Generator,
    cfg: SamplingConfig,
    weights: DecodeWeights,
    rows: dict[str, jax.Array],
    seed: jax.Array,
) -> jax.Array:
    """One device's rows -> tokens ``[rows, max_new_tokens]``; see :func:`_device_inputs`."""
    # Only what conditioning reads: the reference targets (decoder_ids) stay out, so their
    # length bucket never causes a recompilation.
    batch = {k: rows[k] for k in model.spec.batch_keys if k in rows}
    args = (model, weights, cfg, batch, rows["prompt_ids"], rows["prompt_mask"], rows["example"])
    if cfg.strategy == "beam":
        return decode_beam(*args)  # draws nothing: the seed is unused
    return decode_one_per_row(*args, seed)


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
    batch: Mapping[str, Any], keys: tuple[str, ...], num_rows: int, bos_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    """The arrays decoding reads (the prompt and the conditioning ``keys``), ``num_rows`` rows
    (extra rows copy the last one, example -1).

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
        **{k: np.asarray(batch[k]) for k in keys if k in batch},
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


def decoding_weights(
    model: Generator, params: dict[str, Any] | DecodeWeights, cfg: SamplingConfig | Mapping
) -> DecodeWeights:
    """``params`` prepared for decoding in ``sampling.weights_dtype`` (once per loaded model
    if the caller keeps them; :func:`generate` prepares plain parameters per call)."""
    cfg = as_sampling_config(cfg)
    if not isinstance(params, DecodeWeights):
        return decode_weights.prepare(params, model.spec.lora, cfg.weights_dtype)
    if params.dtype != cfg.weights_dtype:
        raise ValueError(
            f"decoding weights are {params.dtype}, but sampling.weights_dtype={cfg.weights_dtype!r}"
        )
    return params


class _Sharded:
    """Model + decoding weights placed on the devices once, callable on one batch at a time."""

    def __init__(self, model: Generator, params, cfg: SamplingConfig, devices):
        devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
        self.fn, mesh = _compiled(model, dataclasses.replace(cfg, seed=0, batch_size=1), devices)
        self.seed = jnp.int32(cfg.seed)
        weights = decoding_weights(model, params, cfg)
        self.weights = jax.device_put(weights, NamedSharding(mesh, P()))
        self.rows_sharding = NamedSharding(mesh, P("batch"))
        # A call's rows: batch_size rounded up so that every device gets the same number.
        self.num_rows = -(-cfg.batch_size // len(devices)) * len(devices)
        self.keys = model.spec.batch_keys
        spec = model.spec
        self.bos_id, self.eos_id, self.pad_id = spec.decoder_family.special_ids(spec.decoder)

    def dispatch(self, chunk: Mapping[str, Any]) -> tuple[np.ndarray, jax.Array]:
        """Start decoding ``chunk`` (asynchronously) -> (its example ids, tokens on device)."""
        inputs = _device_inputs(chunk, self.keys, self.num_rows, self.bos_id, self.pad_id)
        tokens = self.fn(self.weights, jax.device_put(inputs, self.rows_sharding), self.seed)
        return inputs["example"], tokens


def generate(
    model: Generator,
    params: dict[str, Any] | DecodeWeights,
    batch: Mapping[str, Any],
    cfg: SamplingConfig | Mapping[str, Any],
    devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
    """Decode one batch -> tokens ``[batch, max_new_tokens]`` (int32, pad id after EOS).

    ``batch`` holds ``example`` ``[batch]`` (-1 = padding row), the conditioning inputs and
    optionally ``prompt_ids``/``prompt_mask`` ``[batch, T]`` (left padded; default BOS).
    ``params`` as trained, or already prepared by :func:`decoding_weights`.
    """
    cfg = as_sampling_config(cfg)
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
    cfg = as_sampling_config(cfg)
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
    progress = track(split_batches, total, "generate", "batch")
    yield from generate_batches(model, params, progress, sampling_cfg, tokenizer, devices)
