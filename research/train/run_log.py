"""What a run leaves in its workdir besides checkpoints: run.json, metrics.jsonl, TensorBoard.

Only process 0 writes. ``run.json`` holds everything needed to repeat the run: the resolved
config, the exact command, package versions, devices and the git commit, as the first
invocation had them. It is append-only: each later invocation (a resume, an extension of
``train.steps``, an evaluation with overrides) adds an entry to ``invocations`` with its command,
time and the keys it changed, and never rewrites the original. Only keys in
``RESUMABLE_KEYS`` may change on a resume; the others shape the model, the data or the
optimizer state, and :func:`check_resumable` refuses them before anything is written.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from research.config import ConfigError, default_config
from research.errors import ExpectedError
from research.files import atomic_write
from research.train.workdir_lock import locked_update

PACKAGES = (
    "research",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "numpy",
    "torch",
)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str:
    """The commit of the source tree this package runs from ("unknown" outside git)."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_info() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "host": platform.node(),
    }


def run_record(cfg: ml_collections.ConfigDict, command: list[str] | None = None) -> dict[str, Any]:
    return {
        "command": shlex.join(command if command is not None else sys.argv),
        "config": json.loads(cfg.to_json()),
        "versions": package_versions(),
        "devices": device_info(),
        "git_commit": git_commit(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# Keys a resumed run may change (a trailing "." covers a whole section): how long it trains,
# what it logs, how often it evaluates and saves, how it samples, where its processes meet.
# Everything else changes the model, the data or the optimizer state a checkpoint holds.
RESUMABLE_KEYS = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.max_eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.tensorboard",
    "sampling.",
    "eval.",
    "distributed.",
    "cache.",
)
RUN_RECORD = "run.json"


class RunConfigChanged(ConfigError):
    """A resume whose config differs from the run's in keys that shape its checkpoints."""


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.steps": 12, ...}`` of a config as JSON (tuples are lists)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flat_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_json(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(cfg.to_json())


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``{key: new value}`` of the keys whose values differ between two JSON configs.

    A key one side lacks (written by an older or newer version of this code) counts as its
    default, so adding a config key does not make old runs look changed.
    """
    old, new = flat_config(old), flat_config(new)
    defaults = flat_config(config_json(default_config()))
    changed = {}
    for key in sorted(old.keys() | new.keys()):
        if key not in new and key not in defaults:
            continue  # a key this code no longer has can no longer matter
        if old.get(key, defaults.get(key)) != new.get(key, defaults.get(key)):
            changed[key] = new.get(key, defaults.get(key))
    return changed


def structural_hash(cfg: ml_collections.ConfigDict) -> str:
    """sha256 of the keys that shape the checkpoints (not ``RESUMABLE_KEYS``), set or default.

    Keys at their default are left out, so a key added to the code later keeps old hashes.
    """
    defaults = flat_config(config_json(default_config()))
    structural = {
        key: value
        for key, value in flat_config(config_json(cfg)).items()
        if not resumable(key) and (key not in defaults or defaults[key] != value)
    }
    return hashlib.sha256(json.dumps(structural, sort_keys=True).encode()).hexdigest()


def read_run_record(workdir: str | Path) -> dict[str, Any] | None:
    """``workdir/run.json`` as a dict, or None when there is none."""
    path = Path(workdir) / RUN_RECORD
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); restore it from a backup") from None


def current_config(record: dict[str, Any]) -> dict[str, Any]:
    """The run's config now: the original with the changes of every later ``train``."""
    config = json.loads(json.dumps(record["config"]))
    for entry in record.get("invocations", []):
        if entry.get("kind") == "train":
            for key, value in entry["changed"].items():
                *parents, leaf = key.split(".")
                node = config
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
    return config


def check_resumable(workdir: Path, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keys ``cfg`` changes against ``workdir``'s run; raises if any shapes checkpoints."""
    record = read_run_record(workdir)
    if record is None:
        return {}
    changed = config_changes(current_config(record), config_json(cfg))
    refused = sorted(key for key in changed if not resumable(key))
    if refused:
        raise RunConfigChanged(
            f"{workdir / RUN_RECORD}: this config differs from the run's in {', '.join(refused)}, "
            "which shape the model, the data or the optimizer state; use a new --workdir "
            f"(a resume may change only {', '.join(k.replace('.', '.*') if k.endswith('.') else k for k in RESUMABLE_KEYS)})"
        )
    return changed


def record_invocation(
    workdir: Path,
    cfg: ml_collections.ConfigDict,
    kind: str,
    changed: dict[str, Any],
    command: list[str] | None = None,
) -> None:
    """Start ``run.json`` with this invocation, or append it there (never rewriting the rest)."""
    path = workdir / RUN_RECORD
    with locked_update(path):
        record = read_run_record(workdir)
        if record is None:
            write_json(path, run_record(cfg, command))
            return
        record.setdefault("invocations", []).append(
            {
                "kind": kind,
                "command": shlex.join(command if command is not None else sys.argv),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "changed": changed,
                "git_commit": git_commit(),
                "devices": device_info(),
            }
        )
        write_json(path, record)


def write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary file and a rename: never half a file."""
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class MetricsLog:
    """Appends metric rows to ``metrics.jsonl`` and TensorBoard; a no-op off process 0."""

    def __init__(self, workdir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._writer = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split}
        row |= {k: (float(v) if math.isfinite(float(v)) else str(v)) for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"{split}/{key}", float(value), step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MetricsFileError(ExpectedError):
    """A metrics.jsonl line other than the last is not JSON; the message names the line."""


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a partial last line (a torn append) is dropped, warned."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise MetricsFileError(f"{path}:{number}: not a JSON row ({err})") from None
            print(
                f"warning: {path}: dropped a partial last line (line {number}, "
                f"{len(line)} characters; a write was cut short)",
                file=sys.stderr,
            )
    return rows
