"""``research bench``: our speed side by side with Hugging Face's PyTorch models, in one run.

Measurements (``--only NAME``, repeatable):

* ``train_lm``: GPT-2 training step (loss, gradients, clipped AdamW): tokens/s of our pmapped
  step (``research.train.steps``) and of ``GPT2LMHeadModel`` + ``torch.optim.AdamW``, both from
  the same weights; model FLOPs utilisation against the matrix-product peak measured in the
  same run (CPU) or the card's datasheet peak (GPU).
* ``train_conditioned``: the same with a MiniLM encoder conditioning GPT-2 through
  cross-attention, against ``EncoderDecoderModel(BertModel, GPT2LMHeadModel)``.
* ``generate``: greedy decoding, new tokens/s of ``research.sampling.generate`` and of
  ``GPT2LMHeadModel.generate`` (its KV cache), same weights, every row producing all tokens.
* ``train_llama``, ``generate_llama``: ``train_lm`` and ``generate`` for a Llama-family decoder
  of about GPT-2 124M's size (SmolLM2-135M's shape: 30 layers, GQA 9/3, tied, random weights)
  against ``LlamaForCausalLM`` in the same run.
* ``compile``: seconds from the first call to the first result of the train step and of the
  sampler, each in a fresh process (nothing cached), next to PyTorch's first call.
* ``memory``: peak resident memory of a process that trains (first step and a few more),
  ours and PyTorch's, each in a fresh process.
* ``memory_lora``, ``train_lora``: LoRA rank 8 on a bfloat16 frozen base, GPT-2 large's and a
  1B Llama's shapes: peak memory against full fine-tuning and against PyTorch + PEFT, tokens/s
  against PyTorch + PEFT: :mod:`.lora`.
* ``train_frozen_encoder`` (a frozen encoder read from its feature cache vs PEPLER-style
  PyTorch encoding every step), ``loop_overhead`` (``train()`` vs its bare step) and
  ``compile``'s warm-cache case: :mod:`.throughput`.

Every timed measurement warms up, then takes turns (ours, reference, ours, ...) and reports
medians, so the ratio holds on a busy machine. Output: one JSON line per row (machine, device,
versions, shapes, dtype, every timing) and a Markdown table on stdout.

Setups: ``cpu`` (float32, GPT-2 124M, batch 8 x 128), ``gpu`` (chosen when JAX's first device
is a GPU: bfloat16, cuDNN attention, batch 16 x 1024) and ``smoke`` (``--smoke``: a tiny GPT-2
and BERT, a few seconds; the test suite runs it).

Modules: :mod:`.measure` (the measurements), :mod:`.run_state` (what they share: the peak,
the child processes), :mod:`.report` (targets, table), :mod:`.run` (``run_bench``),
:mod:`.ours` and :mod:`.reference` (the two sides: only the reference side imports torch, and
it imports no JAX), :mod:`.batches` (their inputs, numpy only),
``__main__`` (the fresh-process children of ``compile`` and ``memory``). Importing this
package loads neither side, so each child has only its own framework in memory.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MEASUREMENTS": "measure",
    "markdown_table": "report",
    "run_bench": "run",
    "target_for": "report",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"research.bench.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'research.bench' has no attribute {name!r}")
