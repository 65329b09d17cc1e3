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

The fresh processes: ``python -m research.bench.lora SIDE MODE SHAPE SETUP`` (SIDE ``ours``
or ``reference``, MODE ``lora`` or ``full``) prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import jax.numpy as jnp
import numpy as np

from research.bench import ours
from research.bench.common import NO_DROPOUT, Setup, make_setup
from research.models.generator import Generator, GeneratorSpec
from research.models.gpt2 import GPT2Config
from research.models.llama_config import LlamaConfig
from research.models.lora import LoRAConfig

LORA = LoRAConfig(rank=8, alpha=16.0)
SHAPES = ("gpt2_large", "llama_1b")


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


def lora_shape(setup: Setup, name: str) -> LoRAShape:
    """The decoder and batch of ``name`` (one of SHAPES) in ``setup``."""
    if setup.name == "smoke":
        decoder = setup.decoder if name == "gpt2_large" else setup.llama
        return LoRAShape(name, decoder, setup.batch, setup.seq)
    decoder = gpt2_large() if name == "gpt2_large" else llama_1b()
    return LoRAShape(name, decoder, *((8, 1024) if setup.name == "gpu" else (4, 128)))


def _batch(shape: LoRAShape) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, shape.decoder.vocab_size, (shape.batch, shape.seq), dtype=np.int32)
    return {"decoder_ids": ids, "decoder_mask": np.ones_like(ids)}


def _lora_model(setup: Setup, shape: LoRAShape) -> Generator:
    spec = GeneratorSpec(shape.decoder, None, lora=LORA)
    return Generator(spec, jnp.bfloat16, setup.attention_impl)


def ours_step(setup: Setup, shape: LoRAShape, mode: str) -> ours.TrainStep:
    """Our train step: ``lora`` (bfloat16 base, adapters train) or ``full`` (all trains)."""
    if mode == "lora":
        model = _lora_model(setup, shape)
        params = ours.random_params(model, base_dtype=jnp.bfloat16)
        return ours.TrainStep(model, params, _batch(shape), trainable=("lora",))
    model = Generator(GeneratorSpec(shape.decoder, None), setup.jnp_dtype, setup.attention_impl)
    return ours.TrainStep(model, ours.random_params(model), _batch(shape))


def peft_targets(setup: Setup, shape: LoRAShape) -> tuple[list[str], bool]:
    """The Hugging Face modules our adapters sit on, and whether they are ``Conv1D``s, from
    the mapping ``research export --adapters`` writes (``research/peft_export.py``)."""
    import jax

    from research import peft_export
    from research.models import families
    from research.models.generator import init_generator

    model = _lora_model(setup, shape)
    params = jax.eval_shape(lambda: init_generator(model, jax.random.key(0)))
    layers = peft_export.adapted_modules(params["decoder"], shape.decoder, "decoder")
    return [m for m, _ in layers.values()], {lay for _, lay in layers.values()} == {families.KEEP}


def reference_step(setup: Setup, shape: LoRAShape, device: str):
    """transformers + PEFT: the same adapters on a bfloat16 base, AdamW on the adapters."""
    from research.bench import reference

    targets, conv1d = peft_targets(setup, shape)
    s = dataclasses.replace(setup, decoder=shape.decoder, batch=shape.batch, seq=shape.seq)
    ref = reference.ReferenceSetup.of(s)
    model = reference.peft_lm(ref.decoder, LORA, targets, conv1d)
    return reference.TrainStep(model, _batch(shape), ref, device)


def child(side: str, mode: str, shape_name: str, setup: Setup) -> dict[str, Any]:
    """One fresh process: build, train (the first step, then a few more), peak memory."""
    from research.bench.__main__ import _first_and_next, _peak_rss_mib

    shape = lora_shape(setup, shape_name)
    if side == "reference":
        import transformers

        transformers.logging.set_verbosity_error()
        import jax

        from research.bench import reference

        device = reference.device_for(jax.devices()[0].platform)
        step = reference_step(setup, shape, device)
    else:
        step = ours_step(setup, shape, mode)
    result = _first_and_next(step, setup.memory_steps, {"batch": shape.batch, "seq": shape.seq})
    result["peak_rss_mib"] = _peak_rss_mib()
    if side == "ours":
        import jax

        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            result["device_peak_bytes"] = stats["peak_bytes_in_use"]
    return result


CHILDREN = (("ours", "lora"), ("ours", "full"), ("reference", "lora"))


def _child_result(side: str, mode: str, shape: str, setup_name: str) -> dict[str, Any]:
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    cmd = [sys.executable, "-m", "research.bench.lora", side, mode, shape, setup_name]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"benchmark child {' '.join(cmd[2:])} failed (exit {done.returncode}):\n"
            + done.stderr[-3000:]
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory(side: dict[str, Any]) -> float:
    """The figure compared: the device's peak bytes on a GPU, else peak RSS (MiB)."""
    device = side.get("device_peak_bytes")
    return device / 2**20 if device else side["peak_rss_mib"]


def measure_memory_lora(run) -> list[dict[str, Any]]:
    setup, rows = run.setup, []
    for name in SHAPES:
        shape = lora_shape(setup, name)
        # One after another: each process has the machine's memory to itself.
        got = {
            (side, mode): _child_result(side, mode, name, setup.name)
            for side, mode in CHILDREN
            if side == "ours" or run.reference_device is not None
        }
        mine = _memory(got["ours", "lora"])
        for against, case in (
            (("ours", "full"), "LoRA r8 / full fine-tuning (ours)"),
            (("reference", "lora"), "LoRA r8, ours / PyTorch + PEFT"),
        ):
            theirs = _memory(got[against]) if against in got else None
            rows.append(
                {
                    "measurement": "memory_lora",
                    "case": f"{name}: {case}",
                    "unit": "MiB peak",
                    "better": "lower",
                    "ours": mine,
                    "reference": theirs,
                    "ratio": mine / theirs if theirs else None,
                    "shapes": {"batch": shape.batch, "seq": shape.seq},
                    "decoder": shape.decoder.model_type,
                    "children": {f"{s}_{m}": r for (s, m), r in got.items()},
                    "note": "fresh process each; device peak bytes on a GPU, else peak RSS",
                }
            )
    return rows


def measure_train_lora(run) -> list[dict[str, Any]]:
    from research.bench.measure import _speed_row, _train_compare

    setup, rows = run.setup, []
    for name in SHAPES:
        shape = lora_shape(setup, name)
        mine = ours_step(setup, shape, "lora")
        device = run.reference_device
        theirs = reference_step(setup, shape, device) if device is not None else None
        times, first_loss = _train_compare(run, mine, theirs)
        rows.append(
            _speed_row(
                "train_lora",
                f"{name}: LoRA r8, bfloat16 base, {shape.batch} x {shape.seq} tokens",
                shape.batch * shape.seq,
                times,
                {"batch": shape.batch, "seq": shape.seq, "vocab": shape.decoder.vocab_size},
                decoder=shape.decoder.model_type,
                first_loss=first_loss,
            )
        )
        del mine, theirs  # the next shape's models need the memory
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 4 or (argv[0], argv[1]) not in CHILDREN or argv[2] not in SHAPES:
        print(
            "usage: python -m research.bench.lora {ours,reference} {lora,full} "
            f"{{{','.join(SHAPES)}}} SETUP",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(child(argv[0], argv[1], argv[2], make_setup(argv[3]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
