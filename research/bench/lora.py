"""LoRA fine-tuning of big decoders: ``memory_lora`` and ``train_lora``.

Two decoders with random weights: GPT-2 large's shape (774M: 36 layers, 1280 wide) and a
Llama-family decoder of about 1B (TinyLlama-1.1B's published shape: 22 layers, 2048 wide,
GQA 32/4, 32,000 tokens); ``--smoke``: the setup's tiny GPT-2 and Llama. LoRA is rank 8,
alpha 16, on each family's default targets (attention q/k/v/o), the frozen base in bfloat16
(``train.frozen_dtype``) with bfloat16 activations; adapters and AdamW state float32.

* ``memory_lora``: peak memory of a fresh process that trains (the first step and a few
  more): ours with LoRA against ours fully fine-tuned (float32 weights, AdamW on all of them,
  the setup's dtype; target <= 0.35) and against PyTorch + PEFT with LoRA (the same adapters
  on a bfloat16 base, ``get_peft_model``'s float32 adapters; target <= 1). Peak RSS on a CPU;
  on a GPU ours also reports the device's peak bytes.
* ``train_lora``: tokens/s of the LoRA train step, ours against PyTorch + PEFT, taking turns
  in one process (target >= 1).

The fresh processes are ``python -m research.bench lora SIDE SPEC`` (research/bench/__main__.py).
This module is our side's: an ``ours`` child imports it, so it imports no torch (the
reference's steps import research/bench/reference.py when called, in the parent).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research import peft_export
from research.bench import ours
from research.bench.batches import lm_batch
from research.bench.common import NO_DROPOUT, Setup
from research.models import families
from research.models.generator import Generator, GeneratorSpec, init_generator
from research.models.gpt2 import GPT2Config
from research.models.llama_config import LlamaConfig
from research.models.lora import LoRAConfig

LORA = LoRAConfig(rank=8, alpha=16.0)
SHAPES = ("gpt2_large", "llama_1b")
MODES = ("lora", "full")


def gpt2_large() -> GPT2Config:
    return GPT2Config(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, **NO_DROPOUT)


def llama_1b() -> LlamaConfig:
    """TinyLlama-1.1B's published shape."""
    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
        tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LoRAShape:
    name: str
    decoder: GPT2Config | LlamaConfig
    batch: int
    seq: int


def lora_shape(setup: Setup, name: str, layers: int | None = None) -> LoRAShape:
    """The decoder and batch of ``name`` (one of SHAPES) in ``setup``; ``layers``: only that
    many of its layers (the deepest full fine-tuning that fits, see :func:`fitting_layers`)."""
    if setup.name == "smoke":
        decoder = setup.decoder if name == "gpt2_large" else setup.llama
        shape = LoRAShape(name, decoder, setup.batch, setup.seq)
    else:
        decoder = gpt2_large() if name == "gpt2_large" else llama_1b()
        shape = LoRAShape(name, decoder, *((8, 1024) if setup.name == "gpu" else (2, 128)))
    if layers is None:
        return shape
    depth = families.decoder_family(shape.decoder).hf.num_layers(shape.decoder)
    if not 1 <= layers <= depth:
        raise ValueError(f"{name}: layers={layers} must be in [1, {depth}]")
    field = "n_layer" if isinstance(shape.decoder, GPT2Config) else "num_hidden_layers"
    return dataclasses.replace(shape, decoder=dataclasses.replace(shape.decoder, **{field: layers}))


def lora_batch(shape: LoRAShape) -> dict[str, np.ndarray]:
    """Both sides' batch: random tokens ``[batch, seq]``."""
    return lm_batch(np.random.default_rng(0), shape.batch, shape.seq, shape.decoder.vocab_size)


def _lora_model(setup: Setup, shape: LoRAShape) -> Generator:
    spec = GeneratorSpec(shape.decoder, None, lora=LORA)
    return Generator(spec, jnp.bfloat16, setup.attention_impl)


def ours_step(setup: Setup, shape: LoRAShape, mode: str) -> ours.TrainStep:
    """Our train step: ``lora`` (bfloat16 base, adapters train) or ``full`` (all trains)."""
    if mode == "lora":
        model = _lora_model(setup, shape)
        params = ours.random_params(model, base_dtype=jnp.bfloat16)
        return ours.TrainStep(model, params, lora_batch(shape), trainable=("lora",))
    model = Generator(GeneratorSpec(shape.decoder, None), setup.jnp_dtype, setup.attention_impl)
    return ours.TrainStep(model, ours.random_params(model), lora_batch(shape))


# Peak bytes per parameter of each kind of child, from the CPU measurements of 2026-12-01
# (experiments/bench/README.md, "memory_lora / train_lora"), rounded up. Full fine-tuning:
# float32 weights, gradients and AdamW moments (16) plus the step's new weights and moments,
# which XLA holds beside the old ones (12): GPT-2 large passed 20 GB. Our LoRA on a bfloat16
# base: the base (2), its initial host copy (2), the float32 copy of every base weight that
# XLA:CPU makes for its float32 dots (4), activations. PEFT: the base, activations.
PEAK_BYTES_PER_PARAMETER = {"full": 30, "lora": 12, "peft": 5}


def needed_bytes(setup: Setup, shape: LoRAShape, kind: str) -> int:
    """About the peak of a ``kind`` child (``full``, ``lora``: ours; ``peft``) on ``shape``."""
    model = _lora_model(setup, shape)
    params = jax.eval_shape(lambda: init_generator(model, jax.random.key(0)))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    return count * PEAK_BYTES_PER_PARAMETER[kind]


def child_budget() -> int | None:
    """Bytes a child may need: on a GPU the device's limit; on a CPU what Linux has available
    now less a quarter of the machine (headroom for activations, compilation and the other
    processes of a shared machine: a child that does not fit is never started, so the
    out-of-memory killer never has to act). None: unknown (every child runs)."""
    if jax.devices()[0].platform == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except (OSError, ValueError, IndexError):
        return None
    return info["MemAvailable"] - info["MemTotal"] // 4


def fitting_layers(setup: Setup, shape: LoRAShape, budget: int) -> int | None:
    """The most layers of ``shape`` whose full fine-tuning fits ``budget`` (None: not even one;
    the need grows linearly with depth)."""
    one, two = (needed_bytes(setup, lora_shape(setup, shape.name, n), "full") for n in (1, 2))
    per_layer = two - one
    layers = (budget - (one - per_layer)) // per_layer
    depth = families.decoder_family(shape.decoder).hf.num_layers(shape.decoder)
    return min(int(layers), depth) if layers >= 1 else None


def reference_spec(setup: Setup, shape: LoRAShape) -> dict[str, Any]:
    """What the reference side builds, as plain data (JSON for its child process): the
    ``ReferenceSetup`` of the shape and the ``peft.LoraConfig`` fields of our adapters, on
    the Hugging Face modules ``research export --adapters`` maps them to
    (research/peft_export.py)."""
    from research.bench import reference

    model = _lora_model(setup, shape)
    params = jax.eval_shape(lambda: init_generator(model, jax.random.key(0)))
    layers = peft_export.adapted_modules(params["decoder"], shape.decoder, "decoder")
    adapters = {
        "r": LORA.rank,
        "lora_alpha": LORA.alpha,
        "lora_dropout": LORA.dropout,
        "target_modules": [module for module, _ in layers.values()],
        # Kernels kept as stored ([in, out]): GPT-2's Conv1D layers.
        "fan_in_fan_out": {layout for _, layout in layers.values()} == {families.KEEP},
    }
    s = dataclasses.replace(setup, decoder=shape.decoder, batch=shape.batch, seq=shape.seq)
    return {"setup": dataclasses.asdict(reference.ReferenceSetup.of(s)), "adapters": adapters}


def reference_step(setup: Setup, shape: LoRAShape, device: str):
    """transformers + PEFT: the same adapters on a bfloat16 base, AdamW on the adapters."""
    from research.bench import reference

    spec = reference_spec(setup, shape)
    ref = reference.ReferenceSetup(**spec["setup"])
    model = reference.peft_lm(ref.decoder, spec["adapters"])
    return reference.TrainStep(model, lora_batch(shape), ref, device)


CHILDREN = (("ours", "lora"), ("ours", "full"), ("reference", "lora"))
GB = 1e9


def _child_results(run, wanted: dict[Any, tuple[str, str, LoRAShape, int | None]]) -> dict:
    """``{key: (side, mode, shape, layers)}`` -> ``{key: JSON line}`` of each
    ``python -m research.bench lora SIDE SPEC``, a fresh process. Real runs start them one
    after another (each has the machine's memory to itself); the smoke run (tiny models, and
    the test suite waits for it) starts them all at once."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    started, outputs = {}, {}
    for key, (side, mode, shape, layers) in wanted.items():
        if side == "ours":
            spec = {"setup": run.setup.name, "shape": shape.name, "mode": mode, "layers": layers}
        else:
            spec = reference_spec(run.setup, shape) | {"device": run.reference_device}
        cmd = [sys.executable, "-m", "research.bench", "lora", side, json.dumps(spec)]
        pipe = subprocess.PIPE
        started[key] = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, env=env)
        if run.setup.name != "smoke":
            outputs[key] = started[key].communicate()
    results = {}
    for key, child in started.items():
        out, err = outputs.get(key) or child.communicate()
        if child.returncode != 0:
            side, mode, shape, _ = wanted[key]
            raise RuntimeError(
                f"benchmark child lora {side} {mode} {shape.name} failed (exit {child.returncode}):"
                "\n" + err[-3000:]
            )
        results[key] = json.loads(out.strip().splitlines()[-1])
    return results


def _memory(side: dict[str, Any]) -> float:
    """The figure compared: the device's peak bytes on a GPU, else peak RSS (MiB)."""
    device = side.get("device_peak_bytes")
    return device / 2**20 if device else side["peak_rss_mib"]


def _row(name: str, case: str, shape: LoRAShape, mine, theirs, **details) -> dict[str, Any]:
    return {
        "measurement": "memory_lora",
        "case": f"{name}: {case}",
        "unit": "MiB peak",
        "better": "lower",
        "ours": mine,
        "reference": theirs,
        "ratio": mine / theirs if theirs else None,
        "shapes": {"batch": shape.batch, "seq": shape.seq},
        "decoder": shape.decoder.model_type,
        "layers": families.decoder_family(shape.decoder).hf.num_layers(shape.decoder),
        "note": "fresh process each; device peak bytes on a GPU, else peak RSS",
        **details,
    }


def _kind(side: str, mode: str) -> str:
    return "peft" if side == "reference" else mode


def _does_not_fit(what: str, need: int, budget: int) -> str:
    return f"{what} does not fit (estimated peak {need / GB:.1f} GB, budget {budget / GB:.1f} GB)"


def measure_memory_lora(run) -> list[dict[str, Any]]:
    """Per shape: ours LoRA, ours full and PEFT's LoRA, each in a fresh process, one after
    another (each has the machine's memory to itself). A child whose :func:`needed_bytes`
    exceeds :func:`child_budget` is not started (its rows say so); when that is full
    fine-tuning, LoRA and full are compared on the deepest prefix of the decoder whose full
    fine-tuning fits."""
    setup, rows = run.setup, []
    versus_full, versus_peft = "LoRA r8 / full fine-tuning (ours)", "LoRA r8, ours / PyTorch + PEFT"
    for name in SHAPES:
        shape, budget = lora_shape(setup, name), child_budget()
        needs = {kind: needed_bytes(setup, shape, kind) for kind in PEAK_BYTES_PER_PARAMETER}
        fits = {kind: budget is None or need <= budget for kind, need in needs.items()}
        sizes = {
            "estimated_peak_gb": {kind: n / GB for kind, n in needs.items()},
            "budget_gb": budget and budget / GB,
        }
        if not fits["lora"]:
            note = _does_not_fit("our LoRA", needs["lora"], budget)
            for case in (versus_full, versus_peft):
                rows.append(_row(name, case, shape, None, None, not_run=note, **sizes))
            continue
        got = _child_results(
            run,
            {
                (side, mode): (side, mode, shape, None)
                for side, mode in CHILDREN
                if fits[_kind(side, mode)] and (side == "ours" or run.reference_device is not None)
            },
        )
        children = {f"{s}_{m}": r for (s, m), r in got.items()}
        mine = _memory(got["ours", "lora"])
        if fits["full"]:
            full = _memory(got["ours", "full"])
            rows.append(_row(name, versus_full, shape, mine, full, children=children, **sizes))
        else:
            rows.append(_row_cut(run, shape, needs["full"], budget, versus_full, sizes))
        theirs = got.get(("reference", "lora"))
        peft_mib = _memory(theirs) if theirs else None
        details = {} if fits["peft"] else {"not_run": _does_not_fit("PEFT", needs["peft"], budget)}
        rows.append(
            _row(name, versus_peft, shape, mine, peft_mib, children=children, **details, **sizes)
        )
    return rows


def _row_cut(run, shape: LoRAShape, need: int, budget: int, case: str, sizes: dict) -> dict:
    """LoRA against full fine-tuning on the deepest prefix of ``shape`` whose full
    fine-tuning fits ``budget`` (all of it needs ``need`` bytes)."""
    depth = families.decoder_family(shape.decoder).hf.num_layers(shape.decoder)
    note = _does_not_fit(f"full fine-tuning of all {depth} layers", need, budget)
    layers = fitting_layers(run.setup, shape, budget)
    if layers is None:
        return _row(shape.name, case, shape, None, None, not_run=note, **sizes)
    cut = lora_shape(run.setup, shape.name, layers)
    pair = _child_results(run, {mode: ("ours", mode, cut, layers) for mode in MODES})
    return _row(
        shape.name,
        f"{layers} of {depth} layers, {case}",
        cut,
        _memory(pair["lora"]),
        _memory(pair["full"]),
        children={f"ours_{mode}_{layers}_layers": r for mode, r in pair.items()},
        full_does_not_fit=note,
        **sizes,
    )


def measure_train_lora(run) -> list[dict[str, Any]]:
    """Per shape, in this process: our LoRA step and PEFT's taking turns; a shape whose two
    steps together exceed :func:`child_budget` is not run (its row says so)."""
    from research.bench.measure import _speed_row, _train_compare

    setup, rows = run.setup, []
    for name in SHAPES:
        shape, budget = lora_shape(setup, name), child_budget()
        case = f"{name}: LoRA r8, bfloat16 base, {shape.batch} x {shape.seq} tokens"
        shapes = {"batch": shape.batch, "seq": shape.seq, "vocab": shape.decoder.vocab_size}
        need = needed_bytes(setup, shape, "lora") + needed_bytes(setup, shape, "peft")
        if budget is not None and need > budget:
            note = _does_not_fit("our LoRA step and PEFT's in one process", need, budget)
            rows.append(
                {
                    "measurement": "train_lora",
                    "case": case,
                    "unit": "tokens/s",
                    "better": "higher",
                    "ours": None,
                    "reference": None,
                    "ratio": None,
                    "shapes": shapes,
                    "not_run": note,
                }
            )
            continue
        mine = ours_step(setup, shape, "lora")
        device = run.reference_device
        theirs = reference_step(setup, shape, device) if device is not None else None
        times, first_loss = _train_compare(run, mine, theirs)
        rows.append(
            _speed_row(
                "train_lora",
                case,
                shape.batch * shape.seq,
                times,
                shapes,
                decoder=shape.decoder.model_type,
                first_loss=first_loss,
            )
        )
        del mine, theirs  # the next shape's models need the memory
    return rows
