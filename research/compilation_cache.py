"""JAX's persistent compilation cache, switched on from ``cache.compilation_dir``.

With it, a resumed or repeated run (and evaluation, sampling, the ablation's next cell) loads
its compiled steps from disk instead of compiling them again. ``""`` means
``$JAX_COMPILATION_CACHE_DIR`` when set, else ``<user cache dir>/research/jax_compilation``;
``"off"`` compiles every run. The setting is process-wide and applies to what compiles after it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

OFF = "off"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/research`` (default ``~/.cache/research``): caches shared by runs."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "research"


def enable(setting: str) -> Path | None:
    """Use the persistent cache in the folder ``setting`` names; returns it (None when off)."""
    if setting == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    folder = Path(
        setting
        or os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or user_cache_dir() / "jax_compilation"
    )
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder
