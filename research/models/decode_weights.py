"""Decoding weights: the decoder's matrices laid out and typed for memory-bound decoding.

A decoding step reads every weight of the decoder once for a handful of rows, so its speed is
how fast the weights stream from memory. Two things change how fast they stream, neither of
which suits training:

* **Layout.** XLA:CPU multiplies a few rows by a matrix stored output-major (``[out, in]``, as
  ``torch.nn.Linear`` stores it) faster than by the ``[in, out]`` kernels ``nn.Dense`` trains
  (measurements: ``experiments/bench/README.md``, generate).
* **Dtype.** bfloat16 weights (``sampling.weights_dtype``) halve the bytes per step; the
  products then take bfloat16 operands and accumulate in float32.

:func:`prepare` turns a generator's parameters into :class:`DecodeWeights` once (per
``generate`` call or per loaded model, never per step): the decoder's LoRA adapters are merged,
every ``nn.Dense`` kernel of the decoder becomes ``[out, in]`` in the decoding dtype and its
embedding tables take that dtype; biases and norms stay float32. :func:`reading` is the other
half: while active, the decoder's ``nn.Dense`` and ``nn.Embed`` layers compute from those
weights (a Flax method interceptor, as the LoRA adapters are added, so the family modules stay
as they are for every family). Everything outside the decoder (the encoder, the conditioning
methods) runs unchanged from the parameters as trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research import cpu
from research.models import lora as lora_lib
from research.models.precision import out_major_product

WEIGHTS_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class DecodeWeights:
    """A generator's parameters with the decoder's weights prepared for decoding (a pytree)."""

    params: dict[str, Any]
    dtype: str = "float32"  # a key of WEIGHTS_DTYPES


jax.tree_util.register_dataclass(DecodeWeights, data_fields=["params"], meta_fields=["dtype"])


def prepare(
    params: dict[str, Any], lora: lora_lib.LoRAConfig | None = None, dtype: str = "float32"
) -> DecodeWeights:
    """``params`` (``{"decoder": ..., ...}``, as trained) -> :class:`DecodeWeights` in ``dtype``.

    Kernels ``[in, out]`` become ``[out, in]``; ``lora`` is the generator's ``spec.lora`` (its
    decoder adapters are folded into the kernels first, so decoding reads one matrix per layer).
    """
    if dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"sampling.weights_dtype={dtype!r}: choose one of {list(WEIGHTS_DTYPES)}")
    if dtype == "bfloat16" and jax.default_backend() == "cpu" and cpu.lacks_bfloat16_arithmetic():
        warnings.warn(
            "sampling.weights_dtype='bfloat16' on a CPU without bfloat16 arithmetic (no "
            f"{' or '.join(cpu.BFLOAT16_ARITHMETIC)} in /proc/cpuinfo): XLA's bfloat16 products "
            "are slower than float32 here, so decoding is too; float32 weights decode faster "
            "(experiments/bench/README.md)",
            stacklevel=2,
        )
    decoder = params["decoder"]
    if lora_lib.has_adapters(decoder):
        decoder = lora_lib.merge(decoder, lora)
    target = WEIGHTS_DTYPES[dtype]

    def convert(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(leaf).T.astype(target)
        return jnp.asarray(leaf).astype(target) if name == "embedding" else leaf

    decoder = jax.jit(lambda tree: jax.tree_util.tree_map_with_path(convert, tree))(decoder)
    return DecodeWeights({**params, "decoder": decoder}, dtype)


def _narrow_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table [vocab, d]`` (bfloat16) rows at ``ids [...]`` -> ``[..., d]``, as ``nn.Embed``.

    XLA:CPU gathers no bfloat16: it gathers from a float32 conversion of the table, and in
    the decoding loop it hoisted that conversion of the whole table out of the loop (a
    float32 copy per ``generate`` call). Tied to the loop's ids by the barrier, the conversion
    stays in the gather's fusion, which converts only the rows it reads
    (experiments/bench/README.md, generate)."""
    table, ids = jax.lax.optimization_barrier((table, ids))
    return jnp.take(table, ids, axis=0)


def _intercept(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    layer = isinstance(module, nn.Dense | nn.Embed) and method == "__call__"
    if not layer or module.path[:1] != ("decoder",):
        return next_fun(*args, **kwargs)
    x = args[0] if args else next(iter(kwargs.values()))
    if isinstance(module, nn.Embed):  # a lookup: float32 rows (the tied LM head reads the
        # table as stored, output-major already: research/models/precision.py's tied_logits)
        table = module.get_variable("params", "embedding")
        narrow = table.dtype == jnp.bfloat16 and jnp.issubdtype(x.dtype, jnp.integer)
        rows = _narrow_lookup(table, x) if narrow else next_fun(*args, **kwargs)
        return rows.astype(module.dtype or module.param_dtype)
    # nn.Dense's output dtype: its own, else the input's promoted with its float32 kernel's.
    out_dtype = module.dtype or jnp.promote_types(x.dtype, module.param_dtype)
    # The kernel is [out, in] here: read as stored (self.param would check [in, out]).
    y = out_major_product(x, module.get_variable("params", "kernel"), out_dtype, out_dtype)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(y.dtype)
    return y


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """While active, the decoder's layers compute from :class:`DecodeWeights`' parameters.

    The decoder's LoRA adapters are already in those kernels: the adapters' interceptor,
    installed inside this one, is never reached by the decoder's layers."""
    with nn.intercept_methods(_intercept):
        yield
