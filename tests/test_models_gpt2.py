"""Flax GPT-2 against transformers' PyTorch GPT-2 (the reference implementation).

Logits are compared only where the attention mask is 1: at padding positions both models
compute garbage that nothing downstream reads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from research.models import attention, families, hf
from research.models.decoder_inputs import DecoderInputs
from research.models.gpt2 import GPT2Config, GPT2LMHead, init_cache
from tests.conftest import GPT2_LAYOUTS, TINY_GPT2, apply_model, mask_positions, randomise_

PARITY_TOL = 1e-4  # max abs logit difference, float32 (the bar)


def fast_key(seed: int) -> jax.Array:
    """A PRNG key whose random bits compile in well under a second on CPU (threefry: ~4 s)."""
    return jax.random.key(seed, impl="rbg")


def valid(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[batch, seq, vocab]`` -> ``[n_valid, vocab]``: the rows where ``mask`` is 1."""
    return np.asarray(logits)[np.asarray(mask).astype(bool)]


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("layout", GPT2_LAYOUTS)
def test_logits_match_pytorch(
    layout, side, tiny_gpt2_folders, tiny_gpt2_torch, gpt2_batches, torch_gpt2_logits
):
    model, params = hf.load_pretrained(tiny_gpt2_folders[layout])
    ids, mask = gpt2_batches[side]
    logits = apply_model(model, params, ids, attention_mask=mask)
    assert logits.shape == (4, 12, TINY_GPT2["vocab_size"]) and logits.dtype == jnp.float32
    expected = torch_gpt2_logits(tiny_gpt2_torch, mask, input_ids=ids)
    assert max_abs_diff(valid(logits, mask), valid(expected, mask)) < PARITY_TOL


def test_left_and_right_padding_agree(tiny_gpt2, gpt2_batches):
    """Position ids follow the mask, so padding side does not change a token's logits."""
    model, params = tiny_gpt2
    (r_ids, r_mask), (l_ids, l_mask) = gpt2_batches["right"], gpt2_batches["left"]
    right = valid(apply_model(model, params, r_ids, attention_mask=r_mask), r_mask)
    left = valid(apply_model(model, params, l_ids, attention_mask=l_mask), l_mask)
    assert max_abs_diff(right, left) < PARITY_TOL


def test_config_variants_match_pytorch(gpt2_batches, tmp_path, torch_gpt2_logits):
    """The config fields that change the computation are honoured: inner width, activation,
    per-layer attention scaling, LayerNorm epsilon."""
    variant = dict(
        TINY_GPT2,
        n_inner=80,
        activation_function="gelu",
        scale_attn_by_inverse_layer_idx=True,
        layer_norm_epsilon=1e-2,
    )
    reference = randomise_(transformers.GPT2LMHeadModel(transformers.GPT2Config(**variant)), 3)
    reference.save_pretrained(tmp_path)
    model, params = hf.load_pretrained(tmp_path)
    ids, mask = gpt2_batches["left"]
    logits = apply_model(model, params, ids, mask)
    expected = torch_gpt2_logits(reference, mask, input_ids=ids)
    assert max_abs_diff(valid(logits, mask), valid(expected, mask)) < PARITY_TOL


@pytest.mark.parametrize(
    "name, hf_kwargs",
    [
        ("distilgpt2", dict(n_layer=6)),
        ("gpt2-medium", dict(n_embd=1024, n_layer=24, n_head=16)),
    ],
)
def test_parameter_shapes_and_count_match_pytorch(name, hf_kwargs):
    """Real GPT-2 sizes build (abstractly: nothing is allocated) with PyTorch's parameters."""
    hf_config = transformers.GPT2Config(**hf_kwargs)
    with torch.device("meta"):
        reference = transformers.GPT2LMHeadModel(hf_config)
    config = GPT2Config.from_dict(hf_config.to_dict())
    shapes = hf.abstract_params(GPT2LMHead(config), config)
    assert sum(math.prod(s.shape) for s in shapes.values()) == reference.num_parameters()
    torch_shapes = {k: tuple(v.shape) for k, v in reference.transformer.state_dict().items()}
    for hf_name, flax_path, layout in hf.expand_table(families.family("gpt2").hf, config):
        want = torch_shapes[hf_name]
        want = want[::-1] if layout == hf.TRANSPOSE else want
        assert tuple(shapes[flax_path].shape) == want, (name, hf_name)


@pytest.mark.parametrize("side", ["right", "left"])
def test_prefix_embeds_match_pytorch_inputs_embeds(
    side, tiny_gpt2, tiny_gpt2_torch, gpt2_batches, torch_gpt2_logits
):
    """prefix_embeds == PyTorch called with inputs_embeds = concat(prefix, wte(ids))."""
    model, params = tiny_gpt2
    ids, mask = gpt2_batches[side]
    prefix = np.random.default_rng(1).normal(0, 0.5, (4, 3, TINY_GPT2["n_embd"]))
    prefix = prefix.astype(np.float32)
    logits = apply_model(model, params, ids, mask, DecoderInputs(prefix_embeds=prefix))
    assert logits.shape == (4, 3 + 12, TINY_GPT2["vocab_size"])
    with torch.no_grad():
        token_embeds = tiny_gpt2_torch.transformer.wte(torch.as_tensor(ids).long())
    embeds = torch.cat([torch.as_tensor(prefix), token_embeds], dim=1)
    full_mask = np.concatenate([np.ones((4, 3), np.int32), mask], axis=1)
    expected = torch_gpt2_logits(tiny_gpt2_torch, full_mask, inputs_embeds=embeds)
    assert max_abs_diff(valid(logits, full_mask), valid(expected, full_mask)) < PARITY_TOL


def test_embed_offset_matches_pytorch_inputs_embeds(
    tiny_gpt2, tiny_gpt2_torch, gpt2_batches, torch_gpt2_logits
):
    """embed_offset == PyTorch called with inputs_embeds = wte(ids) + offset."""
    model, params = tiny_gpt2
    ids, mask = gpt2_batches["left"]
    offset = np.random.default_rng(2).normal(0, 0.5, (4, TINY_GPT2["n_embd"]))
    offset = offset.astype(np.float32)
    logits = apply_model(model, params, ids, mask, DecoderInputs(embed_offset=offset))
    with torch.no_grad():
        embeds = tiny_gpt2_torch.transformer.wte(torch.as_tensor(ids).long())
    embeds = embeds + torch.as_tensor(offset)[:, None, :]
    expected = torch_gpt2_logits(tiny_gpt2_torch, mask, inputs_embeds=embeds)
    assert max_abs_diff(valid(logits, mask), valid(expected, mask)) < PARITY_TOL


# bfloat16 keeps 8 bits of mantissa; measured max abs 0.031 here (0.029-0.046 on other batches).
BF16_TOL = 0.15


def test_bfloat16_compute_stays_close_to_float32(tiny_gpt2_folder, tiny_gpt2, gpt2_batches):
    """bfloat16 compute, float32 params: logits within BF16_TOL (max abs) of float32.

    Measured max abs difference 0.031 on these batches (logits up to ~3.2), 0.029-0.046 on five
    other random batches; the tolerance leaves 3x margin. Parameters stay float32 and logits
    come back float32.
    """
    model, params = tiny_gpt2
    bf16_model, bf16_params = hf.load_pretrained(tiny_gpt2_folder, dtype=jnp.bfloat16)
    assert bf16_model.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf16_params))
    for ids, mask in gpt2_batches.values():
        full = apply_model(model, params, ids, attention_mask=mask)
        half = apply_model(bf16_model, bf16_params, ids, attention_mask=mask)
        assert half.dtype == jnp.float32
        assert max_abs_diff(valid(half, mask), valid(full, mask)) < BF16_TOL


def test_kv_cache_decoding_matches_pytorch_full_forward(
    tiny_gpt2, tiny_gpt2_torch, gpt2_batches, torch_gpt2_logits
):
    """Prefill a left-padded prompt into the cache, then decode one token at a time."""
    model, params = tiny_gpt2
    ids, mask = gpt2_batches["left"]
    prompt_len, total = 8, ids.shape[1]
    # The decoded tokens follow the prompt, so only the prompt carries padding.
    full_mask = np.concatenate([mask[:, 4:], np.ones((4, 4), np.int32)], axis=1)
    full_ids = np.concatenate([ids[:, 4:], ids[:, :4]], axis=1)
    cache = init_cache(model.config, batch=4, max_len=total)
    logits, cache = apply_model(
        model, params, full_ids[:, :prompt_len], full_mask, cache=cache, cache_index=0
    )
    steps = [logits]
    for t in range(prompt_len, total):
        logits, cache = apply_model(
            model, params, full_ids[:, t : t + 1], full_mask, cache=cache, cache_index=t
        )
        steps.append(logits)
    decoded = np.concatenate(steps, axis=1)
    expected = torch_gpt2_logits(tiny_gpt2_torch, full_mask, input_ids=full_ids)
    assert max_abs_diff(valid(decoded, full_mask), valid(expected, full_mask)) < PARITY_TOL


def test_kv_cache_without_mask_matches_pytorch(tiny_gpt2, tiny_gpt2_torch, gpt2_batches):
    """No attention_mask: every cache slot counts as a real token."""
    model, params = tiny_gpt2
    ids = gpt2_batches["right"][0][:, :8]
    cache = init_cache(model.config, batch=4, max_len=8)
    first, cache = apply_model(model, params, ids[:, :6], cache=cache, cache_index=0)
    steps = [first]
    for t in (6, 7):
        step, cache = apply_model(model, params, ids[:, t : t + 1], cache=cache, cache_index=t)
        steps.append(step)
    with torch.no_grad():
        expected = tiny_gpt2_torch(input_ids=torch.as_tensor(ids).long()).logits.numpy()
    assert max_abs_diff(np.concatenate(steps, axis=1), expected) < PARITY_TOL


def test_kv_cache_with_prefix_matches_pytorch(
    tiny_gpt2, tiny_gpt2_torch, gpt2_batches, torch_gpt2_logits
):
    """A soft prompt prefilled with the prompt takes the first cache slots."""
    model, params = tiny_gpt2
    ids, mask = gpt2_batches["right"]
    ids, n_prefix = ids[:3, :6], 2  # rows of length 6, 6, 3: right padding inside the prompt
    prompt_mask = mask[:3, :6]
    prefix = np.random.default_rng(3).normal(0, 0.5, (3, n_prefix, TINY_GPT2["n_embd"]))
    prefix = prefix.astype(np.float32)
    # Slots: prefix, prompt, then 3 decoded tokens.
    next_ids = np.array([[5, 6, 7], [8, 9, 10], [11, 12, 13]], np.int32)
    full_mask = np.concatenate(
        [np.ones((3, n_prefix), np.int32), prompt_mask, np.ones((3, 3), np.int32)], axis=1
    )
    cache = init_cache(model.config, batch=3, max_len=full_mask.shape[1])
    logits, cache = apply_model(
        model,
        params,
        ids,
        full_mask,
        DecoderInputs(prefix_embeds=prefix),
        cache=cache,
        cache_index=0,
    )
    steps = [logits]
    for j in range(3):
        index = n_prefix + ids.shape[1] + j
        logits, cache = apply_model(
            model, params, next_ids[:, j : j + 1], full_mask, cache=cache, cache_index=index
        )
        steps.append(logits)
    decoded = np.concatenate(steps, axis=1)

    all_ids = torch.as_tensor(np.concatenate([ids, next_ids], axis=1)).long()
    with torch.no_grad():
        token_embeds = tiny_gpt2_torch.transformer.wte(all_ids)
    embeds = torch.cat([torch.as_tensor(prefix), token_embeds], dim=1)
    expected = torch_gpt2_logits(tiny_gpt2_torch, full_mask, inputs_embeds=embeds)
    assert max_abs_diff(valid(decoded, full_mask), valid(expected, full_mask)) < PARITY_TOL


def cross_attention_params(params, torch_model, n_layer):
    """Our params plus the cross-attention sublayers copied from a PyTorch GPT-2.

    transformers' ``add_cross_attention`` blocks use the same names and Conv1D layouts as
    ours (``h.{i}.crossattention.{q_attn,c_attn,c_proj}``, ``h.{i}.ln_cross_attn``).
    """
    state = {k: v.numpy() for k, v in torch_model.transformer.state_dict().items()}
    flat = traverse_util.flatten_dict(params, sep="/")
    for i in range(n_layer):
        for sub in ("q_attn", "c_attn", "c_proj"):
            flat[f"h_{i}/crossattention/{sub}/kernel"] = state[f"h.{i}.crossattention.{sub}.weight"]
            flat[f"h_{i}/crossattention/{sub}/bias"] = state[f"h.{i}.crossattention.{sub}.bias"]
        flat[f"h_{i}/ln_cross_attn/scale"] = state[f"h.{i}.ln_cross_attn.weight"]
        flat[f"h_{i}/ln_cross_attn/bias"] = state[f"h.{i}.ln_cross_attn.bias"]
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def cross_attention_torch(tiny_gpt2_torch):
    """PyTorch GPT-2 with cross-attention in every block: the tiny GPT-2's weights plus
    random cross-attention sublayers (random c_proj too, so they matter)."""
    config = transformers.GPT2Config(**TINY_GPT2, add_cross_attention=True)
    model = randomise_(transformers.GPT2LMHeadModel(config), seed=1)
    model.load_state_dict(tiny_gpt2_torch.state_dict(), strict=False)
    return model


def test_cross_attention_matches_pytorch(tiny_gpt2, cross_attention_torch, gpt2_batches):
    """cross_attention_every=1 == transformers' add_cross_attention GPT-2, with a padded
    encoder batch, both without a cache and decoding from one."""
    _, params = tiny_gpt2
    config = GPT2Config(**TINY_GPT2)
    model = GPT2LMHead(config, cross_attention_every=1)
    params = cross_attention_params(params, cross_attention_torch, config.n_layer)
    ids, mask = gpt2_batches["left"]
    rng = np.random.default_rng(4)
    encoder_states = rng.normal(0, 1, (4, 5, config.n_embd)).astype(np.float32)
    encoder_mask = (np.arange(5)[None, :] < np.array([[5], [3], [1], [4]])).astype(np.int32)
    encoder = DecoderInputs(encoder_states=encoder_states, encoder_mask=encoder_mask)
    logits = apply_model(model, params, ids, mask, encoder)

    with torch.no_grad():
        expected = cross_attention_torch(
            input_ids=torch.as_tensor(ids).long(),
            attention_mask=torch.as_tensor(mask).long(),
            position_ids=torch.as_tensor(mask_positions(mask)).long(),
            encoder_hidden_states=torch.as_tensor(encoder_states),
            encoder_attention_mask=torch.as_tensor(encoder_mask).long(),
        ).logits.numpy()
    assert max_abs_diff(valid(logits, mask), valid(expected, mask)) < PARITY_TOL

    cache = init_cache(config, batch=4, max_len=12)
    first, cache = apply_model(model, params, ids[:, :10], mask, encoder, cache=cache)
    steps = [first]
    for t in (10, 11):
        # The encoder's keys/values come from the cache after the prefill.
        step, cache = apply_model(
            model,
            params,
            ids[:, t : t + 1],
            mask,
            encoder.for_steps(),
            cache=cache,
            cache_index=t,
        )
        steps.append(step)
    decoded = np.concatenate(steps, axis=1)
    assert max_abs_diff(valid(decoded, mask), valid(expected, mask)) < PARITY_TOL


def test_fresh_cross_attention_leaves_pretrained_decoder_unchanged(tiny_gpt2, gpt2_batches):
    """Initialised cross-attention (c_proj = 0) adds nothing: logits equal plain GPT-2's."""
    model, params = tiny_gpt2
    ids, mask = gpt2_batches["right"]
    crossed = GPT2LMHead(model.config, cross_attention_every=2)
    encoder = DecoderInputs(
        encoder_states=np.ones((4, 5, 16), np.float32), encoder_mask=np.ones((4, 5))
    )
    fresh = jax.jit(crossed.init)(fast_key(0), ids, mask, encoder)["params"]
    assert set(fresh["h_1"]) == {"ln_1", "attn", "ln_2", "mlp", "ln_cross_attn", "crossattention"}
    assert "crossattention" not in fresh["h_0"]
    merged = {**fresh, **{k: v for k, v in params.items() if k != "h_1"}}
    merged["h_1"] = {**fresh["h_1"], **params["h_1"]}
    with_cross = apply_model(crossed, merged, ids, mask, encoder)
    plain = apply_model(model, params, ids, mask)
    assert max_abs_diff(valid(with_cross, mask), valid(plain, mask)) == 0.0


def test_attention_dropout_path_equals_fused_path_when_nothing_is_dropped():
    """The einsum path used for attention dropout computes the same function as
    jax.nn.dot_product_attention (checked at a rate so small that no weight is dropped)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.normal(0, 1, (2, 6, 4, 8)).astype(np.float32) for _ in range(3))
    key_valid = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    mask = attention.causal_mask(key_valid, q_len=6)
    fused = jax.jit(attention.attend, static_argnames="scale")(q, k, v, mask, scale=8**-0.5)
    einsum = jax.jit(attention.attend, static_argnames=("scale", "dropout_rate"))(
        q, k, v, mask, scale=8**-0.5, dropout_rate=1e-7, dropout_rng=fast_key(0)
    )
    rows = np.repeat(key_valid.astype(bool)[:, :, None], 4, axis=2)  # query rows with a key
    assert max_abs_diff(np.asarray(fused)[rows], np.asarray(einsum)[rows]) < 1e-5


def test_dropout_only_in_training_mode(tiny_gpt2, gpt2_batches):
    """deterministic=False (training) draws dropout masks from the 'dropout' rng."""
    model, params = tiny_gpt2
    ids, mask = gpt2_batches["right"]
    evaluation = apply_model(model, params, ids, mask)
    train = [
        apply_model(model, params, ids, mask, deterministic=False, rngs={"dropout": fast_key(s)})
        for s in (0, 1)
    ]
    assert max_abs_diff(train[0], evaluation) > 1e-3
    assert max_abs_diff(train[0], train[1]) > 1e-3
