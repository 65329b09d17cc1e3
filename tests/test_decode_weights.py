"""Decoding weights (research/models/decode_weights.py) against the parameters as trained.

* float32, output-major: prefill + one-token steps give the full forward's logits (trained
  layout, no cache) and greedy decoding its argmax tokens, for GPT-2 with cross-attention and
  LoRA adapters on decoder and encoder, and for a Llama with an untied LM head. (Greedy and
  beam search against transformers' ``generate`` run through the same weights in
  tests/test_sampling.py and tests/test_llama_pipeline.py.)
* bfloat16: the stated agreement with the float32 path (below).
* The output-major product against numpy's, for each row count it treats differently, in
  float32 and bfloat16; the bfloat16 token lookup in a decoding loop against the table's rows.
* The warning that bfloat16 weights decode slower on a CPU without bfloat16 arithmetic, from
  /proc/cpuinfo's flags (research/cpu.py).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import cpu, sampling
from research.models import decode_weights, precision
from research.models import lora as lora_lib
from research.models.bert import BertConfig
from research.models.gpt2 import GPT2Config
from research.models.llama_config import LlamaConfig
from research.sampling import runner
from tests.conftest import (
    TINY_LLAMA,
    apply_model,
    conditioning_batch,
    incremental_and_full,
    random_generator,
)

PARITY_TOL = 1e-4  # max abs logit difference, float32 (as tests/test_sampling.py)
# bfloat16 weights (8 significant bits) and bfloat16 product operands, measured on these tiny
# random models: logits move by up to ~0.03 (they span about +-2.4), the teacher-forced argmax
# moves at a near-tie only.
BF16_LOGIT_TOL = 0.1
BF16_ARGMAX_AGREEMENT = 0.9
BF16_GREEDY_AGREEMENT = 0.75  # greedy tokens equal to float32's (a divergence compounds)

ENCODER = BertConfig(
    vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=48, max_position_embeddings=32,
)  # fmt: skip
DECODERS = {
    "gpt2": GPT2Config(
        vocab_size=97, n_positions=48, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=96, eos_token_id=96,
    ),
    "llama": LlamaConfig.from_dict(
        {**TINY_LLAMA, "vocab_size": 97, "tie_word_embeddings": False,
         "bos_token_id": 96, "eos_token_id": 96}
    ),
}  # fmt: skip
CASES = {
    # Cross-attention (decoder layers owned by conditioning), adapters on both parts.
    "gpt2": ("cross_attention", lora_lib.LoRAConfig(rank=2, parts=("decoder", "encoder"))),
    "llama": ("prefix", lora_lib.LoRAConfig(rank=2)),
}


@functools.cache
def generator(family: str):
    conditioning, lora = CASES[family]
    return random_generator(DECODERS[family], ENCODER, conditioning, lora)


def teacher_forced(family: str, weights_dtype: str):
    model, params = generator(family)
    config = DECODERS[family]
    batch = conditioning_batch(ENCODER.vocab_size, 3)
    incremental, full, _, _ = incremental_and_full(
        model, params, batch, config.vocab_size - 1, 96, weights_dtype
    )
    return incremental.reshape(-1, config.vocab_size), full.reshape(-1, config.vocab_size)


def full_forward_greedy(model, params, batch, new_tokens: int, eos: int) -> np.ndarray:
    """Greedy tokens ``[rows, new_tokens]`` re-running the whole sequence (from BOS) through the
    trained layout at every step; EOS is forbidden, as ``min_new_tokens`` does."""
    ids = np.full((len(batch["example"]), 1), eos, np.int32)  # BOS = EOS here
    for _ in range(new_tokens):
        inputs = {**batch, "decoder_ids": ids, "decoder_mask": np.ones_like(ids)}
        logits = np.array(apply_model(model, params, inputs))[:, -1]
        logits[:, eos] = -np.inf
        ids = np.concatenate([ids, logits.argmax(-1)[:, None].astype(np.int32)], axis=1)
    return ids[:, 1:]


def greedy(family: str, weights_dtype: str) -> np.ndarray:
    model, params = generator(family)
    cfg = sampling.SamplingConfig(
        max_new_tokens=10, min_new_tokens=10, batch_size=4, weights_dtype=weights_dtype
    )
    return sampling.generate(model, params, conditioning_batch(ENCODER.vocab_size, 4), cfg)


@pytest.mark.parametrize("family", CASES)
def test_float32_decoding_weights_give_the_trained_layouts_logits_and_tokens(family):
    incremental, full = teacher_forced(family, "float32")
    assert np.max(np.abs(incremental - full)) < PARITY_TOL
    model, params = generator(family)
    batch = conditioning_batch(ENCODER.vocab_size, 4)
    expected = full_forward_greedy(model, params, batch, 10, 96)
    np.testing.assert_array_equal(greedy(family, "float32"), expected)


@pytest.mark.parametrize("family", CASES)
def test_bfloat16_weights_agree_with_float32(family):
    incremental, full = teacher_forced(family, "bfloat16")
    error = np.max(np.abs(incremental - full))
    assert 0 < error < BF16_LOGIT_TOL  # > 0: the weights really were bfloat16
    assert (incremental.argmax(-1) == full.argmax(-1)).mean() >= BF16_ARGMAX_AGREEMENT
    agreement = (greedy(family, "bfloat16") == greedy(family, "float32")).mean()
    assert agreement >= BF16_GREEDY_AGREEMENT


@pytest.mark.parametrize("family", CASES)
def test_bfloat16_products_as_x_at_w_t_give_the_weight_major_tokens(family, monkeypatch):
    # The tiny models' products are all narrower than BFLOAT16_WEIGHT_MAJOR_MAX_OUT: greedy
    # decoding with every bfloat16 product as x @ W^T (the LM head's arrangement) against
    # every one weight-major. The compiled sampler is cached per (model, settings): cleared.
    tokens = {}
    for max_out in (0, 1 << 30):
        monkeypatch.setattr(precision, "BFLOAT16_WEIGHT_MAJOR_MAX_OUT", max_out)
        runner._compiled.cache_clear()
        tokens[max_out] = greedy(family, "bfloat16")
    runner._compiled.cache_clear()
    np.testing.assert_array_equal(tokens[0], tokens[1 << 30])


def test_weights_dtype_is_validated_with_its_choices():
    with pytest.raises(ValueError, match=r"sampling.weights_dtype='int8'.*float32, bfloat16"):
        sampling.SamplingConfig.from_config({"weights_dtype": "int8"})
    model, params = generator("gpt2")
    weights = sampling.decoding_weights(model, params, {"weights_dtype": "bfloat16"})
    leaf = weights.params["decoder"]["h_0"]["mlp"]["c_fc"]["kernel"]
    assert leaf.dtype == np.dtype("bfloat16") and leaf.shape == (4 * 32, 32)  # [out, in]
    # Prepared weights are reused as they are, and refused for another weights_dtype.
    assert sampling.decoding_weights(model, weights, {"weights_dtype": "bfloat16"}) is weights
    with pytest.raises(ValueError, match="decoding weights are bfloat16"):
        sampling.decoding_weights(model, weights, {})


@pytest.mark.parametrize("family", CASES)
def test_bfloat16_token_lookup_in_a_loop_gives_the_tables_rows(family):
    # The lookup as the decoding loop runs it (one row per step in a while loop; bfloat16
    # lookups have their own path): exactly the stored rows, as float32.
    model, params = generator(family)
    weights = sampling.decoding_weights(model, params, {"weights_dtype": "bfloat16"})
    name = {"gpt2": "wte", "llama": "embed_tokens"}[family]
    table = weights.params["decoder"][name]["embedding"]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, table.shape[0], (6, 4, 1)))

    def lookups(weights, ids):
        def step(t, out):
            with decode_weights.reading():
                rows = model.apply(
                    {"params": weights.params},
                    ids[t],
                    method=lambda m, x: getattr(m.decoder, name)(x),
                )
            return out.at[t].set(rows)

        return jax.lax.fori_loop(0, len(ids), step, jnp.zeros((*ids.shape, table.shape[1])))

    got = np.asarray(jax.jit(lookups)(weights, ids))
    assert table.dtype == jnp.bfloat16 and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.asarray(table.astype(jnp.float32))[np.asarray(ids)])


@pytest.mark.parametrize("out", [40, precision.BFLOAT16_WEIGHT_MAJOR_MAX_OUT + 1])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lead", [(1, 1), (4, 1), (2, 3), (precision.WEIGHT_MAJOR_MAX_ROWS + 1,)])
def test_out_major_product_is_the_plain_product_for_every_row_count(lead, dtype, out):
    # One row (padded to two in bfloat16), a few (weight-major; bfloat16 wider than
    # BFLOAT16_WEIGHT_MAJOR_MAX_OUT: x @ W^T), and more than WEIGHT_MAJOR_MAX_ROWS.
    # bfloat16: the operands rounded, the sum in float32.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, 24), np.float32)
    weight = jnp.asarray(rng.standard_normal((out, 24), np.float32), dtype)  # [out, in]
    y = precision.out_major_product(jnp.asarray(x), weight, jnp.float32, jnp.float32)
    assert y.shape == (*lead, out) and y.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    expected = rounded @ np.asarray(weight.astype(jnp.float32)).T
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_cpuinfo_gives_the_model_and_the_matrix_features_present():
    """Two processors' /proc/cpuinfo (abridged): an AVX2-only EPYC (Zen 3) and one with
    AVX-512 and bfloat16 arithmetic (Zen 4); the first processor's lines count. Without an x86
    ``flags`` line (another architecture) the features are unknown, not empty."""
    zen3 = "flags\t\t: fpu sse2 avx fma avx2 bmi2 sha_ni vaes\n"
    zen4 = "flags\t\t: fpu avx2 fma avx512f avx512_vnni avx512_bf16 avx512_fp16x\n"
    text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\n" + zen3
    text += "processor\t: 1\nmodel name\t: other\n" + zen4
    assert cpu.parse_cpuinfo(text) == ("AMD EPYC 7B13", ["avx2", "fma"])
    features = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert cpu.parse_cpuinfo("model name : AMD EPYC\n" + zen4) == ("AMD EPYC", features)
    assert cpu.parse_cpuinfo("Features\t: fp asimd bf16\n") == (None, None)


@pytest.mark.parametrize(
    ("dtype", "features", "warns"),
    [
        ("bfloat16", ["avx2", "fma"], True),
        ("bfloat16", ["avx2", "fma", "avx512f", "avx512_bf16"], False),
        ("bfloat16", ["avx2", "amx_bf16"], False),
        ("bfloat16", None, False),  # unknown CPU: no claim
        ("float32", ["avx2", "fma"], False),
    ],
)
def test_bfloat16_weights_warn_only_on_a_cpu_without_bfloat16_arithmetic(
    monkeypatch, dtype, features, warns
):
    monkeypatch.setattr(cpu, "host_cpu", lambda: ("some CPU", features))
    params = {"decoder": {"layer": {"kernel": jnp.ones((3, 2))}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = decode_weights.prepare(params, dtype=dtype)
    slow = [w for w in caught if "without bfloat16 arithmetic" in str(w.message)]
    assert len(slow) == (1 if warns else 0)
    assert prepared.params["decoder"]["layer"]["kernel"].shape == (2, 3)
