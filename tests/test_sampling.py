"""Decoding (research/sampling/) against two references.

* The full forward pass: prefill + one-token steps from the KV cache give the same logits as
  ``Generator.__call__`` on the whole sequence, for every conditioning method.
* transformers' PyTorch ``generate``: greedy and beam search on a tiny GPT-2 saved by
  transformers give the same tokens, EOS stopping and padding included.

Devices: the Makefile's XLA_FLAGS gives 4 host devices, so sharded decoding really shards.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from research import sampling
from research.data.tokenizers import gpt2_tokenizer
from research.models.conditioning import METHODS
from research.models.generator import Generator
from research.models.gpt2 import GPT2Config
from research.sampling import runner
from research.sampling.processors import repetition_penalized
from research.sampling.search import first_argmax
from tests.conftest import (
    TINY_ENCODER,
    TINY_GPT2,
    apply_model,
    conditioning_batch,
    generate_pair,
    incremental_and_full,
    left_padded_prompts,
    random_generator,
    randomise_,
)
from tests.conftest import torch_generate as reference_generate

PARITY_TOL = 1e-4  # max abs logit difference, float32 (the bar)

# --- A tiny generator with every conditioning method --------------------------------------

DECODER = GPT2Config(
    vocab_size=97, n_positions=48, n_embd=32, n_layer=2, n_head=4, bos_token_id=96, eos_token_id=96
)
ENCODER = TINY_ENCODER
# Every single method, and one combination of two prefixes.
CONDITIONINGS = tuple(METHODS) + ("prefix+id_prompt",)


@functools.cache
def tiny_generator(conditioning: str) -> tuple[Generator, dict]:
    return random_generator(DECODER, ENCODER, conditioning)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_incremental_decoding_equals_full_forward(conditioning):
    """Prefill a left-padded prompt, feed the rest one token at a time; every logit agrees."""
    model, params = tiny_generator(conditioning)
    batch = conditioning_batch(ENCODER.vocab_size, 3)
    incremental, full, ids, mask = incremental_and_full(
        model, params, batch, DECODER.vocab_size - 1, DECODER.eos_token_id
    )
    assert np.max(np.abs(incremental - full)) < PARITY_TOL
    # The conditioning matters: another user/item/encoder input changes the logits.
    if conditioning != "none":
        other = apply_model(
            model,
            params,
            {
                **conditioning_batch(ENCODER.vocab_size, 3, seed=5),
                "decoder_ids": ids,
                "decoder_mask": mask,
            },
        )
        decoded = np.asarray(other)[:, -full.shape[1] :]
        assert np.max(np.abs(decoded - full)) > 1e-2


# --- Against transformers' generate on a tiny GPT-2 ---------------------------------------

# An EOS id that this random model (seed 1) emits within a few steps for some prompts only.
HF_EOS = 408
HF_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(PyTorch GPT2LMHeadModel, our Generator, its params) for one tiny checkpoint."""
    config = transformers.GPT2Config(**dict(TINY_GPT2, bos_token_id=HF_EOS, eos_token_id=HF_EOS))
    torch.manual_seed(0)
    torch_model = randomise_(transformers.GPT2LMHeadModel(config), seed=1)
    torch_model.generation_config.pad_token_id = HF_EOS
    return generate_pair(torch_model, tmp_path_factory.mktemp("tiny_gpt2_eos"))


@pytest.fixture(scope="module")
def prompts() -> dict[str, np.ndarray]:
    return left_padded_prompts(HF_EOS)


def torch_generate(torch_model, prompts, **kwargs) -> np.ndarray:
    return reference_generate(torch_model, prompts, HF_NEW_TOKENS, HF_EOS, **kwargs)


@pytest.mark.parametrize(
    "strategy, settings",
    [
        ("greedy", {}),
        ("beam", {"num_beams": 4, "length_penalty": 1.0}),
        ("greedy", {"no_repeat_ngram_size": 2, "min_new_tokens": 4}),
        ("beam", {"num_beams": 3, "length_penalty": 2.0, "no_repeat_ngram_size": 3}),
    ],
)
def test_matches_transformers_generate(hf_pair, prompts, strategy, settings):
    torch_model, model, params = hf_pair
    expected = torch_generate(torch_model, prompts, **settings)
    cfg = sampling.SamplingConfig(
        strategy=strategy, max_new_tokens=HF_NEW_TOKENS, batch_size=8, **settings
    )
    # Six rows on four devices: eight rows, two of them padding.
    ours = sampling.generate(model, params, prompts, cfg)
    np.testing.assert_array_equal(ours, expected)
    # EOS really stopped some rows early (then pad), while others ran to the end.
    lengths = sampling.output_lengths(ours, HF_EOS)
    assert (lengths < HF_NEW_TOKENS).any() and (lengths == HF_NEW_TOKENS).any()


@pytest.mark.parametrize(
    "strategy, settings",
    [
        ("greedy", {"repetition_penalty": 1.5}),
        ("greedy", {"repetition_penalty": 0.7, "no_repeat_ngram_size": 2}),
        ("beam", {"num_beams": 3, "repetition_penalty": 1.3}),
    ],
)
def test_repetition_penalty_matches_transformers_generate(hf_pair, prompts, strategy, settings):
    """Token for token. The prompts are unpadded: transformers also penalizes the pad id of a
    left-padded batch (it counts every input column), which we do not (padding is not text)."""
    torch_model, model, params = hf_pair
    full = {k: v[prompts["prompt_mask"].all(1)] for k, v in prompts.items()}
    full = {k: np.concatenate([v, v[:, ::-1] if v.ndim > 1 else v + 2]) for k, v in full.items()}
    expected = torch_generate(torch_model, full, **settings)
    cfg = sampling.SamplingConfig(
        strategy=strategy, max_new_tokens=HF_NEW_TOKENS, batch_size=8, **settings
    )
    ours = sampling.generate(model, params, full, cfg)
    np.testing.assert_array_equal(ours, expected)
    plain = sampling.generate(model, params, full, dataclasses.replace(cfg, repetition_penalty=1))
    assert not np.array_equal(ours, plain)  # the penalty changed the output


def test_warpers_match_transformers():
    logits = np.random.default_rng(0).normal(0, 2, (5, 40)).astype(np.float32)
    for top_k, top_p, temperature in ((0, 0.9, 1.0), (5, 1.0, 0.7), (7, 0.5, 1.3)):
        cfg = sampling.SamplingConfig(
            strategy="sample", top_k=top_k, top_p=top_p, temperature=temperature
        )
        warpers = [transformers.TemperatureLogitsWarper(temperature)]
        if top_k:
            warpers.append(transformers.TopKLogitsWarper(top_k))
        if top_p < 1:
            warpers.append(transformers.TopPLogitsWarper(top_p))
        expected = transformers.LogitsProcessorList(warpers)(None, torch.as_tensor(logits))
        ours = np.asarray(sampling.warp(jnp.asarray(logits), cfg))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected.numpy()))
        kept = ~np.isinf(ours)
        np.testing.assert_allclose(ours[kept], expected.numpy()[kept], rtol=1e-6)


def test_repetition_penalty_matches_transformers():
    """Mixed-sign logits, repeats in the history, against HF's processor."""
    rng = np.random.default_rng(1)
    history = rng.integers(0, 12, (4, 7)).astype(np.int32)
    logits = rng.normal(0, 2, (4, 12)).astype(np.float32)
    for penalty in (1.3, 0.5):
        processor = transformers.RepetitionPenaltyLogitsProcessor(penalty)
        expected = processor(torch.as_tensor(history).long(), torch.as_tensor(logits)).numpy()
        ours = repetition_penalized(
            jnp.asarray(logits), jnp.asarray(history), jnp.ones(history.shape, bool), penalty
        )
        np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-6)
        assert not np.allclose(expected, logits)
    # Columns not counted (output not written yet) are not penalized.
    counted = np.zeros(history.shape, bool)
    ours = repetition_penalized(jnp.asarray(logits), jnp.asarray(history), counted, 1.3)
    np.testing.assert_array_equal(np.asarray(ours), logits)


def test_first_argmax_equals_numpy_argmax():
    """Greedy's argmax against numpy's: ties (few distinct values) go to the first index, a
    NaN wins (the first one), a row of -inf gives 0; a GPT-2-sized vocabulary too."""
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, (8, 50257)).astype(np.float32)
    logits[1, [7, 900]] = np.nan
    logits[2] = -np.inf
    logits[3, -1] = 10.0  # the last column
    expected = np.argmax(logits, axis=-1)
    assert len(set(expected.tolist())) > 2  # not every row's answer is the same
    ours = jax.jit(first_argmax)(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(ours), expected)
    small = rng.normal(size=(5, 3, 11)).astype(np.float32)  # leading axes, small vocabulary
    np.testing.assert_array_equal(np.asarray(first_argmax(small)), np.argmax(small, axis=-1))


def test_repeated_ngrams_match_transformers():
    """Unpadded rows with many repeats (vocabulary of 4) against HF's processor."""
    rng = np.random.default_rng(0)
    history = rng.integers(0, 4, (6, 10)).astype(np.int32)
    banned = jax.jit(sampling.repeated_ngram_mask, static_argnums=(3, 4))
    for n in (1, 2, 3):
        for length in (2, 5, 10):
            processor = transformers.NoRepeatNGramLogitsProcessor(n)
            scores = processor(torch.as_tensor(history[:, :length]), torch.zeros(6, 4))
            ours = banned(jnp.asarray(history), jnp.ones(history.shape, bool), length, n, 4)
            np.testing.assert_array_equal(np.asarray(ours), np.isinf(scores.numpy()))


# --- Devices, seeds, compilation ---------------------------------------------------------


def split_batches(batch: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, 11, size)]


def test_four_devices_equal_one():
    """11 examples in batches of 4 (last one partial) on 4 devices and on 1 device.

    Sampling, since its random streams must not depend on the device either; greedy and beam
    search run on 4 devices in the transformers comparison above."""
    assert jax.local_device_count() == 4, (
        "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    )
    model, params = tiny_generator("cross_attention")
    batches = split_batches(conditioning_batch(ENCODER.vocab_size, 11), 4)
    cfg = sampling.SamplingConfig(strategy="sample", max_new_tokens=6, batch_size=4, top_p=0.9)
    many = list(sampling.generate_batches(model, params, batches, cfg))
    one = list(sampling.generate_batches(model, params, batches, cfg, devices=jax.devices()[:1]))
    assert [g.example for g in many] == list(range(11))
    assert many == one


def test_sampling_is_deterministic_per_seed_and_top_k_1_is_greedy():
    model, params = tiny_generator("id_prompt")
    batch = conditioning_batch(ENCODER.vocab_size, 8)

    def run(**settings):
        cfg = sampling.SamplingConfig(max_new_tokens=8, batch_size=8, **settings)
        return sampling.generate(model, params, batch, cfg)

    first = run(strategy="sample", seed=3)
    np.testing.assert_array_equal(first, run(strategy="sample", seed=3))
    assert (first != run(strategy="sample", seed=4)).any()
    np.testing.assert_array_equal(run(strategy="sample", top_k=1), run(strategy="greedy"))


def test_beam_rows_are_independent_under_every_conditioning():
    """Beam search repeats each row's prefix, offset and encoder keys/values over its beams and
    reorders the cache per row: a row decoded with others equals that row decoded alone."""
    model, params = tiny_generator("prefix+cross_attention+additive+id_prompt")
    batch = conditioning_batch(ENCODER.vocab_size, 3)
    # This random model repeats one token; banning repeats makes the beams differ.
    cfg = sampling.SamplingConfig(
        strategy="beam", num_beams=3, max_new_tokens=6, batch_size=4, no_repeat_ngram_size=1
    )
    one_device = jax.devices()[:1]
    together = sampling.generate(model, params, batch, cfg, devices=one_device)
    for row in range(3):
        alone = {k: v[row : row + 1] for k, v in batch.items()}
        np.testing.assert_array_equal(
            sampling.generate(model, params, alone, cfg, devices=one_device)[0], together[row]
        )
    assert len({tuple(r) for r in together}) == 3  # the conditioning changes the output


def test_generate_for_split_drops_padding_rows_and_decodes_text(hf_pair):
    """Batches as EvalIterator yields them: the last one padded with example -1 rows."""
    _, model, params = hf_pair
    cfg = sampling.SamplingConfig(max_new_tokens=5, batch_size=4)
    batches = [{"example": np.array([0, 1, 2, 3])}, {"example": np.array([4, -1, -1, -1])}]
    tokenizer = gpt2_tokenizer()
    out = list(sampling.generate_for_split(model, params, batches, tokenizer, cfg))
    assert [g.example for g in out] == [0, 1, 2, 3, 4]
    for g in out:
        assert HF_EOS not in g.token_ids and len(g.token_ids) <= 5
        assert g.text == tokenizer.decode(g.token_ids).strip()


def test_compiled_once_for_batches_of_the_same_shape(hf_pair, monkeypatch):
    """Three batches (the last one partial) and a second pass: one trace in all."""
    _, model, params = hf_pair
    cfg = sampling.SamplingConfig(max_new_tokens=5, batch_size=4)
    traces = []
    trace_once = runner._generate_rows

    def counted(*args):
        traces.append(args[1].strategy)  # runs only while jit traces
        return trace_once(*args)

    monkeypatch.setattr(runner, "_generate_rows", counted)
    runner._compiled.cache_clear()  # whatever other tests compiled before
    batches = [{"example": np.arange(i, min(i + 4, 10))} for i in range(0, 10, 4)]
    first = list(sampling.generate_batches(model, params, batches, cfg))
    second = list(sampling.generate_batches(model, params, batches, cfg))
    # The seed is an input, not a compile-time constant.
    list(sampling.generate_batches(model, params, batches, dataclasses.replace(cfg, seed=9)))
    runner._compiled.cache_clear()  # drop the counting version
    assert traces == ["greedy"]
    assert first == second and [g.example for g in first] == list(range(10))


def test_sampling_config_round_trip_and_errors():
    cfg = sampling.sampling_config()
    cfg.strategy = "beam"
    assert sampling.SamplingConfig.from_config(cfg).strategy == "beam"
    with pytest.raises(ValueError, match="sampling.strategy='nucleus'"):
        sampling.SamplingConfig(strategy="nucleus")
    with pytest.raises(ValueError, match="sampling.top_p"):
        sampling.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="sampling.beam_size is not a setting"):
        sampling.SamplingConfig.from_config({"beam_size": 4})
