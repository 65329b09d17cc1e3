"""What every measurement shares: the shapes of a run, the machine, timing, FLOPs and peaks."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research import assets
from research.cpu import host_cpu
from research.models import families
from research.models.bert import BertConfig
from research.models.gpt2 import GPT2Config
from research.models.hf import read_config
from research.models.llama_config import LlamaConfig

# Dense bfloat16 peaks (FLOP/s) of the cards whose MFU we report against the datasheet.
# Matched in order against jax's device_kind, so "H100 PCIe" must come before "H100".
CARD_PEAKS_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@dataclasses.dataclass(frozen=True)
class Setup:
    """The shapes and settings of one benchmark run ("cpu", "gpu" or "smoke").

    Dropout is off in every model (ours and the reference alike): the steps compare the same
    computation, and ``jax.nn.dot_product_attention`` has no dropout.
    """

    name: str
    decoder: GPT2Config | LlamaConfig
    encoder: BertConfig
    batch: int  # training rows
    seq: int  # decoder tokens per training row
    encoder_seq: int  # encoder tokens per row (train_conditioned)
    prompt: int  # generate: prompt tokens per row
    new_tokens: int  # generate: new tokens per row
    generate_batches: tuple[int, ...]
    dtype: str  # "float32" or "bfloat16"
    attention_impl: str | None  # for jax.nn.dot_product_attention
    warmup: int
    repeats: int
    memory_steps: int  # train steps the memory/compile child runs after the first one
    llama: LlamaConfig | None = None  # train_llama / generate_llama: a Llama-family decoder

    @property
    def jnp_dtype(self) -> Any:
        return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


def gpt2_124m() -> GPT2Config:
    return GPT2Config(**NO_DROPOUT)


def smollm2_135m() -> LlamaConfig:
    """SmolLM2-135M's published shape (about GPT-2 124M's size): 30 layers, 576 wide, 9 query
    heads sharing 3 key/value heads, tied embeddings, 49,152 tokens."""
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


def minilm_config() -> BertConfig:
    """all-MiniLM-L6-v2's architecture (6 layers, 384 wide), read from the installed asset."""
    _, config = read_config(assets.minilm_folder())
    return dataclasses.replace(config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make_setup(name: str) -> Setup:
    """``cpu``: the issue's CPU shapes; ``gpu``: bfloat16, cuDNN attention, sequence 1024;
    ``smoke``: a tiny GPT-2 and BERT so the whole benchmark runs in seconds."""
    if name == "smoke":
        decoder = GPT2Config(
            vocab_size=1000, n_positions=64, n_embd=64, n_layer=1, n_head=4,
            bos_token_id=999, eos_token_id=999, **NO_DROPOUT,
        )  # fmt: skip
        encoder = BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        llama = LlamaConfig(
            vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
            bos_token_id=999, eos_token_id=999,
        )  # fmt: skip
        return Setup(
            name, decoder, encoder, 2, 16, 16, 4, 4, (1, 2), "float32", None, 1, 2, 1, llama
        )
    common = dict(
        decoder=gpt2_124m(), encoder=minilm_config(), prompt=16, new_tokens=64, llama=smollm2_135m()
    )
    if name == "cpu":
        return Setup(
            name, **common, batch=8, seq=128, encoder_seq=128, generate_batches=(1, 16),
            dtype="float32", attention_impl=None, warmup=1, repeats=5, memory_steps=2,
        )  # fmt: skip
    if name == "gpu":
        return Setup(
            name, **common, batch=16, seq=1024, encoder_seq=128, generate_batches=(1, 16),
            dtype="bfloat16", attention_impl="cudnn", warmup=2, repeats=10, memory_steps=5,
        )  # fmt: skip
    raise ValueError(f"unknown benchmark setup {name!r}; valid: cpu, gpu, smoke")


def default_setup_name(smoke: bool) -> str:
    if smoke:
        return "smoke"
    return "gpu" if jax.devices()[0].platform == "gpu" else "cpu"


# --- The machine ----------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


@functools.cache
def environment() -> dict[str, Any]:
    """Machine, accelerator and library versions: the fields every JSON line carries."""
    device = jax.devices()[0]
    cpu, features = host_cpu()
    return {
        "machine": {
            "node": platform.node(),
            "cpu": cpu,
            "cpu_features": features or [],
            "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)),
            "system": platform.platform(),
        },
        "device": {
            "platform": device.platform,
            "kind": device.device_kind,
            "count": jax.device_count(),
        },
        "versions": {
            name: _version(name)
            for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")
        }
        | {"python": platform.python_version()},
    }


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --- Timing -----------------------------------------------------------------------------------


def interleaved(
    runs: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, the functions taking turns (ours, theirs, ours, ...).

    Taking turns exposes both to the same background load, so their ratio holds on a busy
    machine better than either absolute number. Every function must block until its result
    exists. ``warmup`` untimed rounds come first (compilation, allocator warm-up).
    """
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


# --- FLOPs and peaks --------------------------------------------------------------------------


def lm_train_flops_per_token(params: dict[str, Any], config: Any, seq: int) -> float:
    """Training FLOPs per token of a decoder: ``6 N + 12 L d T`` (PaLM, appendix B).

    ``N`` counts the weights that take part in matrix products: every kernel plus the token
    embedding when it is the tied LM head (GPT-2, SmolLM2); the position table and the
    norm/bias vectors are left out. ``12 L d T`` is attention's two products (scores and
    values) over all ``T`` keys, forward and backward, as the unfused XLA attention computes
    them; ``d`` is the hidden width (= query heads x head_dim in the shapes benchmarked here).
    """
    family = families.decoder_family(config)
    width, layers = family.hidden_size(config), family.hf.num_layers(config)
    n = config.vocab_size * width if getattr(config, "tie_word_embeddings", True) else 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if getattr(path[-1], "key", None) == "kernel":
            n += leaf.size
    return 6.0 * n + 12.0 * layers * width * seq


def matmul_flops(fn: Callable, *args) -> float:
    """FLOPs of every matrix product in ``fn(*args)``, counted on its jaxpr: ``2 * out * K``.

    A second way to count what the closed forms count; the benchmark uses it where no closed
    form is written down (the conditioned model).
    """
    closed = jax.make_jaxpr(fn)(*args)
    return _jaxpr_matmul_flops(closed.jaxpr)


def _jaxpr_matmul_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * np.prod(out) * np.prod([lhs[d] for d in contract])
        # A scan runs its body `length` times; other sub-programs (jit, custom_jvp) run once.
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in subjaxprs(eqn.params):
            total += repeat * _jaxpr_matmul_flops(sub)
    return total


def subjaxprs(params: dict[str, Any]):
    for value in params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def card_peak_flops(device_kind: str) -> float | None:
    """The datasheet's dense bfloat16 peak of a known GPU, else None."""
    for name, peak in CARD_PEAKS_BF16:
        if name in device_kind:
            return peak
    return None
