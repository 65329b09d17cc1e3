"""Tokenizers against independent references.

GPT-2: known ids, and OpenAI's original byte-level BPE algorithm (``encoder.py`` of the GPT-2
release, re-typed below) run on the same files. Encoder: transformers' AutoTokenizer and the
line numbers of the model's own ``vocab.txt``.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import regex
from transformers import AutoTokenizer

from research import assets
from research.data.tokenizers import encoder_tokenizer, gpt2_tokenizer

TEXTS = [
    "Hello world",
    "The food wasn't great, but I'd go back!!",
    "  leading spaces,   runs of spaces\nand new\n\nlines\n",
    "Café crème brûlée — 5 stars ★★★★★",
    "emoji 🍕🍕 and 日本語 text",
    "numbers 1234567 and 3.14159, it's we've they'll I'm",
]


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


_PRETOKENIZE = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


class OpenAIReferenceBPE:
    """OpenAI's GPT-2 ``encoder.py`` algorithm: a second, independent BPE implementation."""

    def __init__(self, folder: Path):
        self.encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}

    def bpe(self, token: str) -> tuple[str, ...]:
        word = tuple(token)
        while len(word) > 1:
            pairs = zip(word[:-1], word[1:], strict=True)
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        byte_chars = _bytes_to_unicode()
        ids = []
        for piece in _PRETOKENIZE.findall(text):
            token = "".join(byte_chars[b] for b in piece.encode("utf-8"))
            ids += [self.encoder[part] for part in self.bpe(token)]
        return ids


@pytest.fixture(scope="module")
def reference_bpe():
    return OpenAIReferenceBPE(assets.gpt2_bpe_folder())


@pytest.fixture(scope="module")
def hf_layout_folder(tmp_path_factory):
    """The same BPE files renamed to Hugging Face's layout (vocab.json + merges.txt)."""
    folder = tmp_path_factory.mktemp("gpt2_hf_layout")
    source = assets.gpt2_bpe_folder()
    shutil.copy(source / "encoder.json", folder / "vocab.json")
    shutil.copy(source / "vocab.bpe", folder / "merges.txt")
    return folder


def test_hello_world_has_gpt2_ids():
    assert gpt2_tokenizer().encode("Hello world") == [15496, 995]


def test_endoftext_is_bos_eos_and_pad():
    tok = gpt2_tokenizer()
    assert len(tok) == 50257
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 50256
    assert tok.encode("<|endoftext|>") == [50256]


@pytest.mark.parametrize("layout", ["openai", "huggingface", "tokenizer.json"])
def test_both_layouts_match_openai_reference_bpe(layout, reference_bpe, hf_layout_folder, tmp_path):
    if layout == "openai":
        tok = gpt2_tokenizer(assets.gpt2_bpe_folder())
    elif layout == "huggingface":
        tok = gpt2_tokenizer(hf_layout_folder)
    else:  # a folder saved by transformers: tokenizer.json
        gpt2_tokenizer(hf_layout_folder).save_pretrained(tmp_path)
        tok = gpt2_tokenizer(tmp_path)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference_bpe.encode(text), text
        assert tok.decode(ids) == text


def test_padding_uses_endoftext(hf_layout_folder):
    batch = gpt2_tokenizer(hf_layout_folder)(["Hello world", "Hi"], padding=True)
    assert batch["input_ids"][1] == [17250, 50256]
    assert batch["attention_mask"] == [[1, 1], [1, 0]]


def test_gpt2_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GPT-2 tokenizer folder .*nowhere does not exist"):
        gpt2_tokenizer(tmp_path / "nowhere")
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(
        FileNotFoundError,
        match=r"holds no GPT-2 BPE files: expected tokenizer\.json, or vocab\.json \+ merges\.txt"
        r" or encoder\.json \+ vocab\.bpe",
    ):
        gpt2_tokenizer(tmp_path)


def test_encoder_tokenizer_matches_autotokenizer_and_vocab(minilm_folder):
    ours = encoder_tokenizer()
    reference = AutoTokenizer.from_pretrained(str(minilm_folder), local_files_only=True)
    for text in TEXTS:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text
    vocab = (minilm_folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
    expected = [vocab.index(t) for t in ("[CLS]", "hello", "world", "[SEP]")]
    assert ours("Hello WORLD")["input_ids"] == expected == [101, 7592, 2088, 102]
    assert ours.pad_token_id == vocab.index("[PAD]") == 0


def test_encoder_tokenizer_missing_folder(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="encoder tokenizer folder .*nowhere does not exist"
    ):
        encoder_tokenizer(tmp_path / "nowhere")
