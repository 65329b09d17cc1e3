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
    ``[batch, seq, vocab]``, the product in ``dtype``.

    ``nn.Embed.attend`` promotes to the table's float32 when the module has no dtype of its
    own, which would run the largest product of a bfloat16 model in float32; giving the table
    a dtype would round the looked-up embeddings (the residual stream) to bfloat16 as well.
    """
    table = embed.embedding.astype(dtype)
    return jnp.dot(hidden.astype(dtype), table.T).astype(jnp.float32)
