"""LoRA adapters alone, in PEFT's layout: ``research export --adapters``.

For each part with adapters (``decoder``, ``encoder``) the export writes a folder that
``peft.PeftModel.from_pretrained(base, folder)`` loads onto the part's Hugging Face model
(``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``BertModel``, ...):

``adapter_config.json``
    PEFT's ``LoraConfig`` fields: ``peft_type="LORA"``, ``r``, ``lora_alpha``, ``lora_dropout``,
    ``target_modules`` (the full Hugging Face module names that carry adapters, e.g.
    ``transformer.h.0.attn.c_attn``, so PEFT's suffix matching adapts no other layer),
    ``fan_in_fan_out`` (true for GPT-2's ``Conv1D`` layers), ``bias="none"``, and
    ``base_model_name_or_path`` (the run's ``init.<part>``; empty for a seeded base).
``adapter_model.safetensors``
    ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
    ``[out, r]``: PEFT's names (the adapter name left out, as PEFT saves them) and the
    layouts of its ``nn.Linear`` adapters. Ours are ``A`` ``[in, r]`` and ``B`` ``[r, out]``
    (``research/models/lora.py``) acting as ``x A B``; PEFT computes ``lora_B(lora_A(x))`` =
    ``x A_pt^T B_pt^T``, so each is the transpose. Both scale by ``alpha / r``.

GPT-2's attention projection ``c_attn`` is one fused ``Conv1D`` in Hugging Face and in our
model alike (q, k and v side by side), so our adapter on it is exactly one PEFT ``c_attn``
adapter; no block structure is needed. An adapter on a layer without a Hugging Face module
(a cross-attention sublayer) is an error naming it. The conditioning parameters go to
``conditioning.safetensors`` as in a merged export (``research/export.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from research.models import families, hf, lora
from research.runs import hf_part

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _modules(config: Any) -> dict[str, tuple[str, str]]:
    """``{flax layer path: (Hugging Face module name, layout)}`` of a part's Dense kernels."""
    arch = families.family(config.model_type).hf
    out = {}
    for hf_name, flax_path, layout in hf.expand_table(arch, config):
        if flax_path.endswith("/kernel") and hf_name.endswith(".weight"):
            out[flax_path.removesuffix("/kernel")] = (
                arch.save_prefix + hf_name.removesuffix(".weight"),
                layout,
            )
    return out


def adapted_modules(params: dict[str, Any], config: Any, part: str) -> dict[str, tuple]:
    """``{flax layer path: (Hugging Face module name, layout)}`` of the layers of one part
    (``params``: that part's tree, arrays or shapes) that carry adapters."""
    modules = _modules(config)
    out = {}
    for path in sorted(traverse_util.flatten_dict(params, sep="/")):
        if not path.endswith("/lora_a"):
            continue
        layer = path.removesuffix("/lora_a")
        if layer not in modules:
            raise hf.CheckpointError(
                f"{part}/{layer} has LoRA adapters but no Hugging Face {config.model_type} "
                "module to carry them in PEFT's layout; export merged instead"
            )
        out[layer] = modules[layer]
    return out


def peft_adapter(
    params: dict[str, Any], config: Any, adapters: lora.LoRAConfig, base: str, part: str
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config, tensors)`` of one part's adapters (``params``: that part's tree)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    layers = adapted_modules(params, config, part)
    tensors = {}
    for layer, (module, _) in layers.items():
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            weight = np.asarray(flat[f"{layer}/{ours}"], np.float32).T
            tensors[f"{PEFT_PREFIX}{module}.{theirs}.weight"] = np.ascontiguousarray(weight)
    targets = [module for module, _ in layers.values()]
    layouts = {layout for _, layout in layers.values()}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if part == "decoder" else "FEATURE_EXTRACTION",
        "base_model_name_or_path": base,
        "r": adapters.rank,
        "lora_alpha": adapters.alpha,
        "lora_dropout": adapters.dropout,
        "target_modules": targets,
        # A kernel stored as Flax has it ([in, out]) is a Conv1D: PEFT transposes on merge.
        "fan_in_fan_out": layouts == {families.KEEP},
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return adapter_config, tensors


def write_adapters(
    folder: Path, params: dict[str, Any], spec: Any, bases: dict[str, str]
) -> tuple[list[str], dict[str, Any]]:
    """Write one PEFT folder per adapted part into ``folder``; returns ``(parts, rest)``:
    the parts written and every parameter that is neither an adapter nor in a Hugging Face
    part (flat, "/"-joined: the conditioning)."""
    parts, rest = [], {}
    for top, tree in params.items():
        config = getattr(spec, top, None) if top in lora.PARTS else None
        if config is None:
            rest.update(
                {f"{top}/{k}": v for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
            )
            continue
        _, outside = hf_part(tree, config)
        rest.update(
            {
                f"{top}/{k}": v
                for k, v in outside.items()
                if k.split("/")[-1] not in lora.ADAPTER_NAMES
            }
        )
        if not lora.has_adapters(tree):
            continue
        adapter_config, tensors = peft_adapter(tree, config, spec.lora, bases.get(top, ""), top)
        (folder / top).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / top / WEIGHTS_FILE))
        (folder / top / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        parts.append(top)
    return parts, rest
