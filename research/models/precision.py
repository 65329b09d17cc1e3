"""Mixed precision: what ``model.dtype=bfloat16`` computes in bfloat16 and what stays float32.

Parameters are float32 always (gradients and AdamW moments too). Under a bfloat16 compute
dtype the matrix products take bfloat16 operands (each ``nn.Dense`` casts its input and
kernel; the tied LM head goes through :func:`tied_logits`), and so does what runs
elementwise on their outputs (GELU/SiLU, rotary). Kept in float32, as
``torch.autocast(bfloat16)`` keeps them: the residual stream (embeddings, every residual
sum), LayerNorm and RMSNorm statistics and outputs, attention scores and their softmax
(research/models/attention.py), the logits the loss and the samplers read, and the loss.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def tied_logits(embed: nn.Embed, hidden: jax.Array, dtype: Any) -> jax.Array:
    """``hidden [batch, seq, d_model]`` against the token table -> float32 logits
    ``[batch, seq, vocab]``, the product in ``dtype`` (or the table's, if narrower: decoding
    weights, research/models/decode_weights.py).

    ``nn.Embed.attend`` promotes to the table's float32 when the module has no dtype of its
    own, which would run the largest product of a bfloat16 model in float32; giving the table
    a dtype would round the looked-up embeddings (the residual stream) to bfloat16 as well.
    """
    return out_major_product(hidden, embed.embedding, dtype, dtype).astype(jnp.float32)


# Up to this many rows a product runs weight-major (out_major_product); measured
# faster from 2 to 128 rows for GPT-2 124M's decoding products.
WEIGHT_MAJOR_MAX_ROWS = 128
# bfloat16 products with more outputs than this (the tied LM head: 768 -> 50257) run as
# x @ W^T for 2-128 rows too: faster than weight-major inside the decoding loop
# (experiments/bench/README.md, generate); every layer's product stays weight-major.
BFLOAT16_WEIGHT_MAJOR_MAX_OUT = 8192


def out_major_product(x: jax.Array, weight: jax.Array, compute: Any, out_dtype: Any) -> jax.Array:
    """``x [..., in]`` times ``weight [out, in]`` (output-major, as ``torch.nn.Linear`` and the
    token table store it) -> ``[..., out]`` in ``out_dtype``. The operands take the narrowest of
    the input's, the weight's and the ``compute`` dtype; the sum accumulates in ``out_dtype``."""
    operand = min((x.dtype, weight.dtype, jnp.dtype(compute)), key=lambda d: jnp.finfo(d).bits)
    lead = x.shape[:-1]
    x, weight = x.astype(operand), weight.astype(operand)
    rows = x.size // x.shape[-1]
    wide = operand == jnp.bfloat16 and weight.shape[0] > BFLOAT16_WEIGHT_MAJOR_MAX_OUT
    if 1 < rows <= WEIGHT_MAJOR_MAX_ROWS and not wide:
        # XLA:CPU's float32 kernel for a few rows is faster with the weight as the product's
        # left operand (out rows, x's rows as columns); the barrier keeps XLA from folding
        # the transpose back into the product (experiments/bench/README.md, generate).
        # bfloat16 too: as the right operand inside the decoding loop, XLA gave every weight
        # a transposed copy (once per generate call) and the products ran slower on it.
        columns = jax.lax.dot_general(
            weight, x.reshape(rows, -1), (((1,), (1,)), ((), ())), preferred_element_type=out_dtype
        )
        return jax.lax.optimization_barrier(columns).T.reshape(*lead, -1)
    single = rows == 1 and operand == jnp.bfloat16
    if single:
        # XLA:CPU multiplies one bfloat16 row ~10x slower than two (experiments/bench/README.md).
        x = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), operand)])
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    y = jax.lax.dot_general(x, weight, dims, preferred_element_type=out_dtype)
    return y[:1].reshape(*lead, -1) if single else y
