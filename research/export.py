"""``research export``: a trained run as Hugging Face folders, plus one file for everything else.

    research export --workdir runs/NAME --out exports/NAME [--checkpoint best|latest] [--force]
                    [--adapters]

The export folder (format version 1) holds:

``decoder/``
    ``config.json``, ``model.safetensors`` and the GPT-2 tokenizer files. transformers'
    ``GPT2LMHeadModel.from_pretrained`` and ``AutoTokenizer.from_pretrained`` read it and give
    our decoder's logits; ``--config.init.decoder=OUT/decoder`` starts a new run from it.
``encoder/``
    The same for the BERT-family encoder (``BertModel``), when the run's conditioning reads one.
``conditioning.safetensors``
    Every other parameter of the generator, named by its Flax path joined with "/": the prefix
    MLP (``conditioning_prefix/hidden/kernel``), the id tables
    (``conditioning_id_prompt/user/embedding``: row k belongs to ``users[k]`` of
    ``export.json``), the cross-attention sublayers inside the decoder
    (``decoder/h_0/crossattention/...``), rating heads, and whatever a new method adds. Flax
    layout: a Dense kernel is ``[in, out]``.
``export.json``
    ``format_version``; ``config``, the run's resolved config; ``source`` (workdir, checkpoint
    step, the run's ``git_commit``); ``parts``, the Hugging Face subfolders present; ``users`` and
    ``items``, raw ids in table order (index 0 stands for "unseen in training"); ``conditioning``,
    the shape of every tensor of ``conditioning.safetensors``.

LoRA adapters (``model.lora``) are merged into the decoder/encoder weights, so the folders are
plain Hugging Face models; the config then records ``model.lora.rank=0`` (the adapters' settings
stay in ``source.lora``) and the trainable groups name the merged parts instead of ``lora``.
With ``--adapters`` the adapters are written alone instead, in PEFT's layout: ``decoder/``
(and ``encoder/``) hold ``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained(base_model, OUT/decoder)`` loads onto the run's base
(``init.decoder``, recorded in ``source.bases``); ``conditioning.safetensors`` and
``export.json`` are as above (``source.adapters_only`` is true). See ``research/peft_export.py``.

:func:`load_export` rebuilds the generator and all its parameters from these files alone.
Writing happens in a hidden folder beside ``OUT`` that is renamed into place at the end, so an
interrupted export leaves ``OUT`` as it was; a non-empty ``OUT`` is only replaced with ``force``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from research import peft_export
from research.config import ConfigError, from_json_dict
from research.data import tokenizers
from research.models import families, hf, lora
from research.models.build import build_generator
from research.models.generator import Generator, init_generator, load_part
from research.runs import hf_part
from research.train.run_log import read_run_record

FORMAT_VERSION = 1
MANIFEST = "export.json"
CONDITIONING_FILE = "conditioning.safetensors"
PARTS = ("decoder", "encoder")  # the generator's parts that have a Hugging Face family


@dataclasses.dataclass
class ExportedRun:
    """What :func:`load_export` returns: enough to run the generator as the run did."""

    cfg: ml_collections.ConfigDict
    model: Generator
    params: dict[str, Any]
    users: list[str]
    items: list[str]
    manifest: dict[str, Any]


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"--out {out} is not empty; choose a new folder or pass --force to replace it"
        )


def _part_tokenizer(cfg: ml_collections.ConfigDict, part: str):
    if part == "decoder":
        return tokenizers.decoder_tokenizer(cfg.data.decoder_tokenizer or None)
    return tokenizers.encoder_tokenizer(cfg.data.encoder_tokenizer or None)


def write_export(
    folder: Path, run, source: dict[str, Any], adapters_only: bool = False
) -> dict[str, Any]:
    """Write the files of a :class:`~research.eval.evaluate.LoadedRun` into ``folder``."""
    spec, rest, parts = run.model.spec, {}, []
    params, run_config = jax.device_get(run.params), run.cfg.to_dict()
    if adapters_only:
        if spec.lora is None:
            raise ConfigError(
                f"--adapters: {source['workdir']} has no LoRA adapters (model.lora.rank=0)"
            )
        bases = {part: run.cfg.init[part] for part in PARTS}
        parts, rest = peft_export.write_adapters(folder, params, spec, bases)
        source = {**source, "adapters_only": True, "bases": bases}
    elif spec.lora is not None:
        params = lora.merge(params, spec.lora)
        run_config = _merged_config(run_config, spec.lora)
        source = {**source, "lora": dataclasses.asdict(spec.lora)}
    for top, tree in params.items() if not adapters_only else ():
        config = getattr(spec, top, None) if top in PARTS else None
        if config is None:
            rest.update(
                {f"{top}/{k}": v for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
            )
            continue
        inside, outside = hf_part(tree, config)
        module = families.family(config.model_type).module_cls(config)
        hf.save_pretrained(folder / top, module, traverse_util.unflatten_dict(inside, sep="/"))
        _part_tokenizer(run.cfg, top).save_pretrained(str(folder / top))
        rest.update({f"{top}/{k}": v for k, v in outside.items()})
        parts.append(top)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in sorted(rest.items())}
    save_file(tensors, str(folder / CONDITIONING_FILE))
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "parts": parts,
        "conditioning": {k: list(v.shape) for k, v in tensors.items()},
        "users": list(run.dataset.users),
        "items": list(run.dataset.items),
        "rating_mean": run.dataset.rating_mean,  # where a rating head starts (rating.py)
        "config": run_config,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=list) + "\n")
    return manifest


def _merged_config(config: dict[str, Any], adapters: lora.LoRAConfig) -> dict[str, Any]:
    """The run's config as it describes the merged model: no adapters; what trained as
    ``lora`` now lives in the parts that carried them."""
    model, train = dict(config["model"]), dict(config["train"])
    model["lora"] = {**model["lora"], "rank": 0}
    for key in ("trainable", "stage1_trainable"):
        groups = [g for g in train[key] if g != "lora"]
        if len(groups) < len(train[key]):
            groups += [p for p in adapters.parts if p not in groups]
        train[key] = groups
    return {**config, "model": model, "train": train}


def export_run(
    workdir: str | Path,
    out: str | Path,
    force: bool = False,
    which: str = "best",
    overrides: Iterable[tuple[str, str]] = (),
    adapters_only: bool = False,
) -> Path:
    """Export the ``which`` ("best" or "latest") checkpoint of ``workdir`` to ``out``.

    ``overrides`` (``--config.KEY=VALUE``) change the run's saved config, e.g. ``data.path``
    when its data moved. ``adapters_only``: the LoRA adapters in PEFT's layout instead of
    merged weights (``research/peft_export.py``).
    """
    from research.eval.evaluate import load_run

    out, workdir = Path(out), Path(workdir)
    _check_out(out, force)
    run = load_run(workdir, overrides, which=which)
    source = {
        "workdir": str(workdir.resolve()),
        "checkpoint": which,
        "checkpoint_step": run.step,
        "git_commit": read_run_record(workdir)["git_commit"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        manifest = write_export(staging, run, source, adapters_only)
        _move_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    parts = ", ".join(f"{p}/" for p in manifest["parts"])
    print(
        f"Exported step {run.step} of {workdir} to {out}: {parts}, {CONDITIONING_FILE} "
        f"({len(manifest['conditioning'])} tensors), {MANIFEST}"
    )
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is removed only once that is done.

    The export is for sharing: readable by all, as a copied folder would be (the temporary
    names it was written under are private).
    """
    for path in (staging, *staging.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-"))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {folder} a `research export` folder?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise hf.CheckpointError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise hf.CheckpointError(
            f"{path}: format_version={manifest.get('format_version')!r}; "
            f"this code reads version {FORMAT_VERSION}"
        )
    return manifest


def load_export(folder: str | Path) -> ExportedRun:
    """The generator of an export folder and all its parameters, from its files alone."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["source"].get("adapters_only"):
        raise hf.CheckpointError(
            f"{folder} holds LoRA adapters only (PEFT's layout): load them onto their base "
            f"{manifest['source']['bases']} with peft.PeftModel.from_pretrained"
        )
    cfg = from_json_dict(manifest["config"])
    cfg.init.decoder = cfg.data.decoder_tokenizer = str(folder / "decoder")
    if "encoder" in manifest["parts"]:
        cfg.init.encoder = cfg.data.encoder_tokenizer = str(folder / "encoder")
    else:
        cfg.init.encoder = ""
    users, items = manifest["users"], manifest["items"]
    model, _ = build_generator(cfg, len(users), len(items), rating_mean=manifest.get("rating_mean"))
    flat = {}
    for part in manifest["parts"]:
        _, params = load_part(folder / part, part)
        flat.update(
            {f"{part}/{k}": v for k, v in traverse_util.flatten_dict(params, sep="/").items()}
        )
    flat.update(load_file(str(folder / CONDITIONING_FILE)))
    expected = traverse_util.flatten_dict(
        jax.eval_shape(lambda: init_generator(model, jax.random.key(0))), sep="/"
    )
    problems = [f"missing {k}" for k in sorted(expected.keys() - flat.keys())]
    problems += [f"unexpected {k}" for k in sorted(flat.keys() - expected.keys())]
    problems += [
        f"{k} has shape {tuple(flat[k].shape)}, the model needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in flat and tuple(flat[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise hf.CheckpointError(f"{folder}: export does not fit its config: {problems[:5]}")
    params = traverse_util.unflatten_dict(
        {k: jax.numpy.asarray(v, jax.numpy.float32) for k, v in flat.items()}, sep="/"
    )
    return ExportedRun(cfg, model, params, users, items, manifest)
