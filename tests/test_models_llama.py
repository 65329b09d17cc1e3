"""Flax Llama-family decoders against transformers' PyTorch Llama, Qwen2 and Mistral.

Each variant is a tiny random model that transformers builds and saves; together they cover
GQA, tied and untied heads, the ``linear`` and ``llama3`` rope scalings, Llama's optional
biases, Qwen2's q/k/v biases and a sliding window on some layers (Qwen2) or all (Mistral).
Logits are compared only where the attention mask is 1.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from research.models import hf
from research.models.decoder_inputs import DecoderInputs
from research.models.llama import LlamaLM, init_cache, rope_frequencies
from research.models.llama_config import LlamaConfig
from tests.conftest import (
    apply_model,
    padded_batches,
    save_random_models,
    valid_diff,
)
from tests.conftest import torch_lm_logits as torch_logits

PARITY_TOL = 1e-4
VOCAB = 256
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)
# name -> (transformers model class, config class, extra config fields)
VARIANTS = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}),
    "llama_tied_llama3_bias": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        dict(
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            num_key_value_heads=1,
            rope_parameters=LLAMA3_ROPE,
        ),
    ),
    "llama_linear": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig,
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    ),
    "qwen2_sliding": (
        transformers.Qwen2ForCausalLM,
        transformers.Qwen2Config,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "mistral_sliding": (
        transformers.MistralForCausalLM,
        transformers.MistralConfig,
        dict(sliding_window=4, head_dim=32),
    ),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """``{variant: (torch model, folder)}``: random weights saved by transformers."""
    models = {
        name: (model_cls, config_cls(**{**TINY, **extra}))
        for name, (model_cls, config_cls, extra) in VARIANTS.items()
    }
    return save_random_models(tmp_path_factory, models)


@pytest.fixture(scope="module")
def batches():
    """:func:`padded_batches` ``[3, 10]`` of lengths 10, 6, 2."""
    return padded_batches(VOCAB, 10, (10, 6, 2))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_pytorch(variant, side, references, batches):
    reference, folder = references[variant]
    model, params = hf.load_pretrained(folder)
    assert isinstance(model, LlamaLM) and model.config.model_type == variant.split("_")[0]
    ids, mask = batches[side]
    logits = apply_model(model, params, ids, mask)
    assert logits.shape == (3, 10, VOCAB)
    assert valid_diff(logits, torch_logits(reference, mask, input_ids=ids), mask) < PARITY_TOL


def test_config_fields_follow_the_file(references):
    """What each variant's config.json says reaches our config (the parity tests would also
    fail, but this names the field)."""
    config = hf.read_config(references["llama_tied_llama3_bias"][1])[1]
    assert config.tie_word_embeddings and config.qkv_bias and config.o_bias and config.mlp_bias
    assert (config.rope_type, config.rope_factor, config.num_key_value_heads) == ("llama3", 8.0, 1)
    qwen = hf.read_config(references["qwen2_sliding"][1])[1]
    assert qwen.qkv_bias and not qwen.o_bias and qwen.sliding_layers == (False, True)
    mistral = hf.read_config(references["mistral_sliding"][1])[1]
    assert mistral.head_dim == 32 and mistral.sliding_layers == (True, True)
    reference = references["llama_tied_llama3_bias"][0]
    inv_freq = reference.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(rope_frequencies(config), inv_freq, rtol=1e-6)


def test_old_style_rope_scaling_is_read():
    """Files written before transformers 5 keep ``rope_theta`` and ``rope_scaling`` apart."""
    raw = dict(TINY, rope_theta=1e6, rope_scaling={"type": "linear", "factor": 4.0})
    config = LlamaConfig.from_dict(raw)
    assert (config.rope_theta, config.rope_type, config.rope_factor) == (1e6, "linear", 4.0)
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported; valid"):
        LlamaConfig.from_dict(dict(TINY, rope_scaling={"rope_type": "yarn", "factor": 2.0}))


@pytest.mark.parametrize(
    "variant, side",
    [
        ("llama", "left"),
        ("llama", "right"),
        ("qwen2_sliding", "right"),
        ("mistral_sliding", "right"),
    ],
)
def test_prefix_embeds_match_pytorch_inputs_embeds(variant, side, references, batches):
    """A soft prefix takes positions 0..P-1 and the tokens' rotary angles continue from P.

    (With left padding the prefix and the tokens are not adjacent slots; transformers measures
    its sliding window in slots, we in positions, so sliding models are checked right-padded.)
    """
    reference, folder = references[variant]
    model, params = hf.load_pretrained(folder)
    ids, mask = batches[side]
    prefix = np.random.default_rng(1).normal(0, 0.5, (3, 3, 64)).astype(np.float32)
    logits = apply_model(model, params, ids, mask, DecoderInputs(prefix_embeds=prefix))
    with torch.no_grad():
        token_embeds = reference.model.embed_tokens(torch.as_tensor(ids).long())
    embeds = torch.cat([torch.as_tensor(prefix), token_embeds], dim=1)
    full_mask = np.concatenate([np.ones((3, 3), np.int32), mask], axis=1)
    expected = torch_logits(reference, full_mask, inputs_embeds=embeds)
    assert valid_diff(logits, expected, full_mask) < PARITY_TOL


def test_embed_offset_matches_pytorch_inputs_embeds(references, batches):
    reference, folder = references["qwen2_sliding"]
    model, params = hf.load_pretrained(folder)
    ids, mask = batches["left"]
    offset = np.random.default_rng(2).normal(0, 0.5, (3, 64)).astype(np.float32)
    logits = apply_model(model, params, ids, mask, DecoderInputs(embed_offset=offset))
    with torch.no_grad():
        embeds = reference.model.embed_tokens(torch.as_tensor(ids).long())
    expected = torch_logits(
        reference, mask, inputs_embeds=embeds + torch.as_tensor(offset)[:, None]
    )
    assert valid_diff(logits, expected, mask) < PARITY_TOL


@pytest.mark.parametrize("variant", ["llama_tied_llama3_bias", "mistral_sliding"])
def test_kv_cache_with_prefix_matches_full_forward(variant, references, batches):
    """Prefill (prefix + left-padded prompt) then one token per step == one full forward.

    The cache holds only the key/value heads (GQA), and the decoded tokens' positions
    continue after the prefix and the prompt's real tokens.
    """
    model, params = hf.load_pretrained(references[variant][1])
    ids, mask = batches["left"]
    prefix = np.random.default_rng(3).normal(0, 0.5, (3, 2, 64)).astype(np.float32)
    new = np.random.default_rng(4).integers(0, VOCAB, (3, 4)).astype(np.int32)
    full_ids = np.concatenate([ids, new], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    expected = apply_model(model, params, full_ids, full_mask, DecoderInputs(prefix_embeds=prefix))

    slots = np.concatenate([np.ones((3, 2), np.int32), full_mask], axis=1)
    cache = init_cache(model.config, 3, slots.shape[1])
    kv_shape = (3, model.config.num_key_value_heads, 16, model.config.head_dim)
    assert cache["self"][0][0].shape == kv_shape
    logits, cache = apply_model(
        model, params, ids, slots, DecoderInputs(prefix_embeds=prefix), cache=cache, cache_index=0
    )
    steps = [logits[:, -1]]
    for t in range(new.shape[1] - 1):
        step, cache = apply_model(
            model, params, new[:, t : t + 1], slots, cache=cache, cache_index=12 + t
        )
        steps.append(step[:, -1])
    np.testing.assert_allclose(np.stack(steps, 1), expected[:, 11:-1], atol=PARITY_TOL)


def test_padding_never_changes_a_row(references, batches):
    """The same tokens alone, right- or left-padded in a batch give the same logits (positions
    and the sliding window follow the mask)."""
    model, params = hf.load_pretrained(references["mistral_sliding"][1])
    ids, mask = batches["right"]
    alone = apply_model(model, params, ids[1:2, :6], mask[1:2, :6])[0]
    for side in ("right", "left"):
        side_ids, side_mask = batches[side]
        logits = apply_model(model, params, side_ids, side_mask)[1]
        np.testing.assert_allclose(logits[side_mask[1].astype(bool)], alone, atol=PARITY_TOL)


@pytest.mark.parametrize("layout", ["ours", "sharded"])
def test_round_trip_through_transformers(layout, references, batches, tmp_path):
    """Our save_pretrained writes a folder transformers loads with identical logits; a
    transformers folder in sharded safetensors loads into ours."""
    reference, folder = references[
        "llama_tied_llama3_bias" if layout == "ours" else "qwen2_sliding"
    ]
    model, params = hf.load_pretrained(folder)
    if layout == "ours":
        hf.save_pretrained(tmp_path, model, params)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(loaded) is type(reference)
        assert loaded.config.rope_parameters == reference.config.rope_parameters
    else:
        reference.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
        loaded = reference
        model, params = hf.load_pretrained(tmp_path)
    ids, mask = batches["left"]
    logits = apply_model(model, params, ids, mask)
    assert valid_diff(logits, torch_logits(loaded, mask, input_ids=ids), mask) < PARITY_TOL


def test_unsupported_model_type_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gemma"}')
    with pytest.raises(hf.CheckpointError, match=r"model_type='gemma' is not supported.*'llama'"):
        hf.read_config(tmp_path)


def test_smollm2_135m_shape_matches_pytorch_parameter_count():
    """SmolLM2-135M's published shape (tied, GQA 9/3) builds with PyTorch's parameter count."""
    shape = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    )
    hf_config = transformers.LlamaConfig(**shape)
    with torch.device("meta"):
        reference = transformers.LlamaForCausalLM(hf_config)
    config = LlamaConfig.from_dict(hf_config.to_dict())
    shapes = hf.abstract_params(LlamaLM(config), config)
    assert sum(math.prod(s.shape) for s in shapes.values()) == reference.num_parameters()


def test_bfloat16_compute_stays_close(references, batches):
    model, params = hf.load_pretrained(references["llama"][1], dtype=jnp.bfloat16)
    full, _ = hf.load_pretrained(references["llama"][1])
    ids, mask = batches["right"]
    bf16 = apply_model(model, params, ids, mask)
    assert bf16.dtype == jnp.float32
    assert valid_diff(bf16, apply_model(full, params, ids, mask), mask) < 0.15
