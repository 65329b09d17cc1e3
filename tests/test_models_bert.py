"""Flax BERT encoder against transformers' PyTorch BertModel (the reference implementation).

Hidden states are compared only at real tokens: padding rows are never read downstream.
"""

from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from research.data.tokenizers import encoder_tokenizer
from research.models import families, hf
from research.models.bert import BertConfig, BertEncoder, BertOutput
from tests.conftest import apply_model, randomise_

PARITY_TOL = 1e-4  # max abs, float32 (the bar)

# Real review-like sentences of very different lengths, so the batch is mostly padding for some.
SENTENCES = [
    "Great.",
    "The pasta was cold.",
    "Friendly staff, but the wait for a table was far too long.",
    "I ordered the chicken curry and it arrived quickly, hot and well seasoned.",
    "Not worth the price at all.",
    "We stayed three nights; the room was clean, quiet and the breakfast buffet had plenty "
    "of choice, although the coffee machine was broken every single morning.",
    "Would recommend!",
    "The battery lasts two days, the screen is sharp, and the camera is decent in daylight.",
    "Honestly? Meh, it was fine I guess.",
]


@pytest.fixture(scope="module")
def sentence_batch(minilm_folder):
    """MiniLM tokens of SENTENCES, padded: ``input_ids``/``attention_mask`` ``[9, seq]``."""
    encoded = encoder_tokenizer(minilm_folder)(SENTENCES, padding=True, return_tensors="np")
    lengths = encoded["attention_mask"].sum(axis=1)
    assert len(set(lengths.tolist())) >= 8  # really different lengths
    return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)


@pytest.fixture(scope="module")
def minilm_reference(minilm_torch, sentence_batch):
    """PyTorch MiniLM outputs on the batch: (last_hidden_state, pooler_output) in numpy."""
    ids, mask = sentence_batch
    with torch.no_grad():
        out = minilm_torch(
            input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask)
        )
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_minilm_matches_pytorch(minilm, sentence_batch, minilm_reference):
    model, params = minilm
    ids, mask = sentence_batch
    out = apply_model(model, params, ids, mask)
    assert isinstance(out, BertOutput)
    assert out.last_hidden_state.shape == (*ids.shape, 384)
    assert out.pooler_output.shape == (len(SENTENCES), 384)
    hidden, pooled = minilm_reference
    real = mask.astype(bool)
    assert max_abs_diff(out[0][real], hidden[real]) < PARITY_TOL
    assert max_abs_diff(out.pooler_output, pooled) < PARITY_TOL


# bfloat16 keeps 8 bits of mantissa; measured on SENTENCES (hidden values up to ~6.1):
# last hidden state 0.030 max abs, pooler 0.0020.
BF16_HIDDEN_TOL = 0.1
BF16_POOLER_TOL = 0.01


def test_minilm_bfloat16_stays_close_to_float32(minilm_folder, minilm, sentence_batch):
    """bfloat16 compute (float32 params) within BF16_HIDDEN_TOL / BF16_POOLER_TOL of float32.

    Measured 0.030 (last hidden state, values up to ~6.1) and 0.0020 (pooler) max abs on
    SENTENCES; the tolerances leave a 3x and 5x margin.
    """
    model, params = minilm
    half_model, half_params = hf.load_pretrained(minilm_folder, dtype=jnp.bfloat16)
    ids, mask = sentence_batch
    full = apply_model(model, params, ids, mask)
    half = apply_model(half_model, half_params, ids, mask)
    assert half.last_hidden_state.dtype == jnp.float32
    real = mask.astype(bool)
    assert max_abs_diff(half[0][real], full[0][real]) < BF16_HIDDEN_TOL
    assert max_abs_diff(half.pooler_output, full.pooler_output) < BF16_POOLER_TOL


TINY_BERT = dict(
    vocab_size=200,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
    type_vocab_size=3,
    hidden_act="gelu_new",
)


def test_task_checkpoint_with_token_types_matches_pytorch(tmp_path):
    """A random BertForSequenceClassification folder (``bert.`` prefix, classifier head):
    our encoder equals its ``.bert`` with token-type ids, and the head is reported."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**TINY_BERT, num_labels=3)
    reference = randomise_(transformers.BertForSequenceClassification(config), seed=2)
    reference.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"2 unexpected tensors.*classifier\.bias.*classifier"):
        model, params = hf.load_pretrained(tmp_path)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, (3, 10)).astype(np.int32)
    mask = (np.arange(10)[None, :] < np.array([[10], [6], [2]])).astype(np.int32)
    types = rng.integers(0, 3, (3, 10)).astype(np.int32)
    out = apply_model(model, params, ids, mask, types)
    with torch.no_grad():
        expected = reference.bert(
            input_ids=torch.as_tensor(ids).long(),
            attention_mask=torch.as_tensor(mask),
            token_type_ids=torch.as_tensor(types).long(),
        )
    real = mask.astype(bool)
    assert max_abs_diff(out[0][real], expected.last_hidden_state.numpy()[real]) < PARITY_TOL
    assert max_abs_diff(out.pooler_output, expected.pooler_output.numpy()) < PARITY_TOL


def test_bert_base_parameter_shapes_and_count_match_pytorch():
    """bert-base builds abstractly with exactly PyTorch BertModel's parameters."""
    hf_config = transformers.BertConfig()
    with torch.device("meta"):
        reference = transformers.BertModel(hf_config)
    config = BertConfig.from_dict(hf_config.to_dict())
    shapes = hf.abstract_params(BertEncoder(config), config)
    assert sum(math.prod(s.shape) for s in shapes.values()) == reference.num_parameters()
    torch_shapes = {k: tuple(v.shape) for k, v in reference.named_parameters()}
    rows = hf.expand_table(families.family("bert").hf, config)
    assert len(rows) == len(torch_shapes) == len(shapes)
    for hf_name, flax_path, layout in rows:
        want = torch_shapes[hf_name]
        want = want[::-1] if layout == hf.TRANSPOSE else want
        assert tuple(shapes[flax_path].shape) == want, hf_name


def test_minilm_loads_without_warnings(minilm_folder):
    """The real checkpoint has nothing unexpected (its position_ids buffer is known)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        hf.load_pretrained(minilm_folder)
