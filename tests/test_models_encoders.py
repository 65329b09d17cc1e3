"""RoBERTa, XLM-RoBERTa and DistilBERT encoders against transformers' PyTorch models.

Tiny random models that transformers builds and saves. Padding uses each model's pad id, as
its tokenizer would (transformers' RoBERTa derives position ids from it); hidden states are
compared at real tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from research.models import hf
from research.models.bert import BertEncoder
from research.models.distilbert import DistilBertEncoder
from tests.conftest import apply_model, save_random_models, valid_diff

PARITY_TOL = 1e-4
VOCAB = 200
ROBERTA = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=40,
)
# name -> (model class, config); DistilBERT spells the sizes its own way.
ENCODERS = {
    "roberta": (transformers.RobertaModel, transformers.RobertaConfig(**ROBERTA)),
    "xlm-roberta": (
        transformers.XLMRobertaModel,
        transformers.XLMRobertaConfig(**ROBERTA, hidden_act="gelu_new", pad_token_id=3),
    ),
    "distilbert": (
        transformers.DistilBertModel,
        transformers.DistilBertConfig(
            vocab_size=VOCAB,
            dim=64,
            n_layers=2,
            n_heads=4,
            hidden_dim=96,
            max_position_embeddings=40,
        ),
    ),
}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """``{name: (torch model, folder)}``."""
    return save_random_models(tmp_path_factory, ENCODERS, seed_offset=10)


def padded_batch(pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """``ids, mask [3, 9]``: lengths 9, 5, 2, padded with ``pad_id`` on ``side``."""
    rng = np.random.default_rng(0)
    seq, lengths = 9, (9, 5, 2)
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
    ids = rng.integers(5, VOCAB, mask.shape).astype(np.int32)
    ids = np.where(mask == 1, ids, pad_id)
    if side == "left":
        ids = np.stack([np.roll(r, seq - n) for r, n in zip(ids, lengths, strict=True)])
        mask = mask[:, ::-1].copy()
    return ids, mask


def torch_states(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long()
        )
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(ENCODERS))
def test_hidden_states_match_pytorch(name, side, encoders):
    reference, folder = encoders[name]
    model, params = hf.load_pretrained(folder)
    assert model.config.model_type == name
    assert isinstance(model, DistilBertEncoder if name == "distilbert" else BertEncoder)
    ids, mask = padded_batch(reference.config.pad_token_id, side)
    out = apply_model(model, params, ids, mask)
    assert out.last_hidden_state.shape == (3, 9, 64)
    assert valid_diff(out.last_hidden_state, torch_states(reference, ids, mask), mask) < PARITY_TOL


def test_roberta_pooler_matches_pytorch(encoders):
    reference, folder = encoders["roberta"]
    model, params = hf.load_pretrained(folder)
    ids, mask = padded_batch(1, "right")
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids).long(), torch.as_tensor(mask).long())
    pooled = apply_model(model, params, ids, mask).pooler_output
    np.testing.assert_allclose(pooled, expected.pooler_output.numpy(), atol=PARITY_TOL)


def test_roberta_positions_follow_the_mask_not_the_pad_id(encoders):
    """Batches padded with another id (e.g. 0, BERT's) give the same states at real tokens."""
    reference, folder = encoders["roberta"]
    model, params = hf.load_pretrained(folder)
    ids, mask = padded_batch(1, "left")
    zero_padded = np.where(mask == 1, ids, 0)
    expected = torch_states(reference, ids, mask)
    out = apply_model(model, params, zero_padded, mask)
    assert valid_diff(out.last_hidden_state, expected, mask) < PARITY_TOL


@pytest.mark.parametrize("name", list(ENCODERS))
def test_round_trip_through_transformers(name, encoders, tmp_path):
    reference, folder = encoders[name]
    model, params = hf.load_pretrained(folder)
    hf.save_pretrained(tmp_path, model, params)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(reference)
    ids, mask = padded_batch(reference.config.pad_token_id, "right")
    expected = torch_states(reference, ids, mask)
    assert valid_diff(torch_states(loaded, ids, mask), expected, mask) < 1e-6


def test_task_model_prefixes_are_stripped(encoders, tmp_path):
    """A folder saved from DistilBertForMaskedLM (``distilbert.`` prefix, extra head tensors)
    loads the encoder, warning about the head it does not use."""
    reference, _ = encoders["distilbert"]
    task = transformers.DistilBertForMaskedLM(reference.config)
    task.distilbert.load_state_dict(reference.state_dict())
    task.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="unexpected tensors not loaded.*vocab_"):
        model, params = hf.load_pretrained(tmp_path)
    ids, mask = padded_batch(0, "left")
    out = apply_model(model, params, ids, mask)
    assert valid_diff(out.last_hidden_state, torch_states(reference, ids, mask), mask) < PARITY_TOL
