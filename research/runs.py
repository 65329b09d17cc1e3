"""A trained run as a starting point: ``init.decoder=run:WORKDIR`` (and ``init.encoder``).

``run:WORKDIR`` names the workdir of an earlier ``research train``; the new run takes the
decoder (or encoder) of that run's best checkpoint (lowest validation loss; the latest when
none has one). Only the parameters a Hugging Face folder of that family would hold are taken:
the earlier run's conditioning parameters (cross-attention sublayers inside the decoder
included) stay behind, exactly as if the run had been exported (``research export``) and the
new run started from ``OUT/decoder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flax import traverse_util

from research.models import families, hf

RUN_PREFIX = "run:"


def is_run_source(source: str) -> bool:
    return source.startswith(RUN_PREFIX)


def run_workdir(source: str) -> Path:
    """``"run:DIR"`` -> ``DIR``, checked to be a training workdir."""
    workdir = Path(source[len(RUN_PREFIX) :])
    if not (workdir / "run.json").is_file():
        raise FileNotFoundError(
            f"{source!r}: {workdir / 'run.json'} not found; train that run first"
        )
    return workdir


def tokenizer_source(source: str, part: str) -> str:
    """The tokenizer folder that goes with ``init.<part>=source``: the folder itself, or for
    ``run:WORKDIR`` the tokenizer that run used (its ``data.<part>_tokenizer``; "" = default)."""
    from research.train.run_log import current_config, read_run_record

    if not is_run_source(source):
        return source
    record = read_run_record(run_workdir(source))
    return current_config(record)["data"][f"{part}_tokenizer"]


def hf_part(params: dict[str, Any], config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split one part's parameters into (what its Hugging Face folder holds, the rest), flat,
    by the family's conversion table (``research/models/families.py``).

    Keys are Flax paths joined by "/" (``h_0/attn/c_attn/kernel``).
    """
    arch = families.family(config.model_type).hf
    table = {fx for _, fx, _ in hf.expand_table(arch, config)}
    flat = traverse_util.flatten_dict(params, sep="/")
    missing = sorted(table - set(flat))
    if missing:
        raise hf.CheckpointError(f"{config.model_type} parameters missing: {missing[:5]}")
    inside = {k: v for k, v in flat.items() if k in table}
    return inside, {k: v for k, v in flat.items() if k not in table}


def run_part_config(source: str, part: str) -> Any:
    """The architecture (GPT2Config / BertConfig) of ``part`` in the run ``source`` names."""
    from research.eval.evaluate import run_config
    from research.models.build import part_architecture

    cfg = run_config(run_workdir(source))
    return part_architecture(cfg, part, f"init.{part}={source!r}: that run")


def run_part_params(source: str, part: str) -> tuple[Any, dict[str, Any]]:
    """``(config, params)`` of ``part`` from the best checkpoint of the run ``source`` names.

    Reads run.json and the checkpoint's parameters only: neither that run's data nor its
    optimizer state.
    """
    from research.eval.evaluate import restore_params

    config = run_part_config(source, part)
    params, _ = restore_params(run_workdir(source), None, "best")
    inside, _ = hf_part(params[part], config)
    return config, traverse_util.unflatten_dict(inside, sep="/")
