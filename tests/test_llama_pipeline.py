"""A Llama decoder end to end: its folder's tokenizer and conventions, the data, training
under every conditioning method, decoding against transformers' ``generate``, the quickstart.

The decoder is ``write_tiny_llama``'s (tests/conftest.py): random weights and a small
byte-level BPE with Llama's specials (``<s>`` BOS, ``</s>`` EOS, no pad token).
"""

from __future__ import annotations

import numpy as np

from research.config import load_config
from research.data import tokenizers
from research.data.pipeline import cache_key, load_dataset

TINY = "tests/configs/tiny.py"
# The tiny BPE spends 13-16 tokens on a synthetic review (GPT-2: 10-11).
LLAMA_TARGETS = (("data.max_target_tokens", "18"), ("data.target_buckets", "(20,)"))


def test_tokenizer_from_the_folder_pads_with_eos(tiny_llama_torch_and_folder):
    """Llama has no pad token: EOS pads (masks keep it out of attention and loss)."""
    reference, folder = tiny_llama_torch_and_folder
    tok = tokenizers.decoder_tokenizer(folder)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "</s>")
    assert (tok.bos_token_id, tok.eos_token_id) == (
        reference.config.bos_token_id,
        reference.config.eos_token_id,
    )
    assert len(tok) == reference.config.vocab_size


def test_targets_use_the_decoders_tokenizer_and_pad_id(tiny_llama_torch_and_folder):
    """``init.decoder=FOLDER`` makes the data use that folder's tokenizer: rows are
    BOS + tokens + EOS in its ids, batches pad with its pad id, the cache key follows it."""
    _, folder = tiny_llama_torch_and_folder
    cfg = load_config(TINY, [("init.decoder", str(folder)), *LLAMA_TARGETS])
    assert cfg.data.decoder_tokenizer == str(folder)
    dataset = load_dataset(cfg.data)
    tok = dataset.decoder_tokenizer
    split = dataset.splits["train"]
    row = split.decoder[0]
    assert row[0] == tok.bos_token_id == 1 and row[-1] == tok.eos_token_id == 2
    expected = tok(split.target_texts[0], add_special_tokens=False)["input_ids"]
    assert row[1:-1].tolist() == expected[: cfg.data.max_target_tokens]
    batch = next(iter(dataset.eval_iterator("train", 8)))
    assert (batch["decoder_ids"][batch["decoder_mask"] == 0] == tok.pad_token_id).all()
    assert (batch["decoder_mask"] == 0).any()
    gpt2 = tokenizers.decoder_tokenizer(None)
    encoder = tokenizers.encoder_tokenizer(None)
    files = []
    assert cache_key(cfg.data, files, (tok, encoder)) != cache_key(cfg.data, files, (gpt2, encoder))


def test_gpt2_folders_without_tokenizer_files_keep_the_packaged_bpe(tiny_gpt2_folder):
    tok = tokenizers.decoder_tokenizer(tiny_gpt2_folder)
    assert tok.pad_token_id == tok.eos_token_id == tok.bos_token_id == 50256
    assert np.array_equal(
        tok("hello")["input_ids"], tokenizers.gpt2_tokenizer()("hello")["input_ids"]
    )
