"""Llama-family decoders in Flax linen: Hugging Face's ``llama``, ``qwen2`` and ``mistral``.

One module, :class:`LlamaLM`, covers the three model types (SmolLM and TinyLlama are ``llama``):
pre-RMSNorm blocks, rotary position embeddings (plain, ``linear`` or ``llama3`` scaling),
grouped-query attention (``num_key_value_heads`` <= ``num_attention_heads``), a SwiGLU MLP and
an LM head tied to the token embeddings or not. Qwen2 adds biases to q/k/v; Mistral (and Qwen2
with ``use_sliding_window``) limits attention to the last ``sliding_window`` positions.

The conditioning hooks are those of ``research/models/gpt2.py``: ``prefix_embeds`` take the
first positions (so the tokens' rotary angles start after the prefix), ``embed_offset`` is
added to every token embedding, ``cross_attention_every=n`` adds a cross-attention sublayer
(zero-initialised output) to every n-th block, and ``apply(..., cache=, cache_index=)``
decodes from an explicit KV cache holding only the key/value heads (GQA keeps it small).

Positions follow the attention mask (padding takes no position) and the sliding window is
measured in those positions, so neither padding side nor padding amount changes a row.
Parameter names follow Hugging Face's (``layers_0/self_attn/q_proj`` <->
``model.layers.0.self_attn.q_proj``); the config and the checkpoint conversion table are in
``research/models/llama_config.py``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models import families
from research.models.attention import attend, causal_mask, padding_mask
from research.models.decoder_inputs import (
    DecoderInputs,
    cross_attention_kv,
    decoder_entry,
    has_cross_attention,
)
from research.models.llama_config import ACTIVATIONS, CONFIGS, LlamaConfig, hf_table
from research.models.precision import tied_logits


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32) after the config's rope scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    if config.rope_type == "linear":
        return (inv_freq / config.rope_factor).astype(np.float32)
    if config.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and those in
        # between interpolated smoothly.
        factor, low, high = (
            config.rope_factor,
            config.rope_low_freq_factor,
            config.rope_high_freq_factor,
        )
        old_len = config.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq.astype(np.float32)


def rotary_angles(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``[batch, seq]`` positions -> cos, sin ``[batch, seq, 1, head_dim]`` (float32)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_frequencies(config))
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``[batch, seq, heads, head_dim]`` by the angles; the halves of head_dim pair up."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos + rotated * sin).astype(x.dtype)


def init_cache(
    config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Empty cache: per layer keys/values ``[batch, kv_heads, max_len, head_dim]`` (heads
    before positions, as ``research/models/gpt2.py`` explains). Keys are stored rotated.
    ``cross`` is filled by the prefill call when the decoder has cross-attention."""
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    return {
        "self": [
            (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
            for _ in range(config.num_hidden_layers)
        ],
        "cross": None,
    }


def _dense(features: int, dtype: Any, name: str, bias: bool = False, zero: bool = False):
    init = nn.initializers.zeros if zero else nn.initializers.normal(0.02)
    return nn.Dense(
        features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, name=name
    )


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, statistics in float32; returns float32."""

    eps: float

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        return weight * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)


class SelfAttention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, rotary, mask, kv_cache, cache_index, deterministic):
        """x ``[batch, seq, d_model]``; mask ``[batch, 1, seq, kv_len]`` -> (y, cache or None)."""
        cfg = self.config
        batch, seq, _ = x.shape

        def project(name, heads, bias):
            y = _dense(heads * cfg.head_dim, self.dtype, name, bias)(x)
            return y.reshape(batch, seq, heads, cfg.head_dim)

        q = apply_rotary(project("q_proj", cfg.num_attention_heads, cfg.qkv_bias), *rotary)
        k = apply_rotary(project("k_proj", cfg.num_key_value_heads, cfg.qkv_bias), *rotary)
        v = project("v_proj", cfg.num_key_value_heads, cfg.qkv_bias)
        new_kv = None
        if kv_cache is not None:
            new_kv = tuple(
                jax.lax.dynamic_update_slice_in_dim(
                    stored, t.transpose(0, 2, 1, 3).astype(stored.dtype), cache_index, 2
                )
                for stored, t in zip(kv_cache, (k, v), strict=True)
            )
            k, v = (t.transpose(0, 2, 1, 3) for t in new_kv)
        use_dropout = not deterministic and cfg.attention_dropout > 0
        y = attend(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask,
            scale=cfg.head_dim**-0.5,
            dropout_rate=cfg.attention_dropout,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            implementation=self.attention_impl,
        )
        y = y.reshape(batch, seq, cfg.num_attention_heads * cfg.head_dim)
        return _dense(cfg.hidden_size, self.dtype, "o_proj", cfg.o_bias)(y), new_kv


class CrossAttention(nn.Module):
    """Decoder tokens attend to encoder states (no rotary: the encoder has its own positions);
    ``o_proj`` starts at zero, so a pretrained decoder is unchanged until it learns."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        width = self.config.num_attention_heads * self.config.head_dim
        self.q_proj = _dense(width, self.dtype, "q_proj")
        self.k_proj = _dense(width, self.dtype, "k_proj")
        self.v_proj = _dense(width, self.dtype, "v_proj")
        self.o_proj = _dense(self.config.hidden_size, self.dtype, "o_proj", zero=True)

    def _heads(self, x):
        return x.reshape(*x.shape[:2], self.config.num_attention_heads, self.config.head_dim)

    def encoder_kv(self, encoder_states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[batch, enc_len, encoder_dim]`` -> keys, values ``[batch, enc_len, heads, head_dim]``."""
        return self._heads(self.k_proj(encoder_states)), self._heads(self.v_proj(encoder_states))

    def __call__(self, x, kv, encoder_valid):
        k, v = kv
        y = attend(
            self._heads(self.q_proj(x)),
            k.astype(self.dtype),
            v.astype(self.dtype),
            padding_mask(encoder_valid),
            scale=self.config.head_dim**-0.5,
            implementation=self.attention_impl,
        )
        return self.o_proj(y.reshape(*x.shape[:2], -1))


class MLP(nn.Module):
    """SwiGLU: ``down(act(gate(x)) * up(x))``."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, self.dtype, "gate_proj", cfg.mlp_bias)(x)
        up = _dense(cfg.intermediate_size, self.dtype, "up_proj", cfg.mlp_bias)(x)
        return _dense(cfg.hidden_size, self.dtype, "down_proj", cfg.mlp_bias)(
            ACTIVATIONS[cfg.hidden_act](gate) * up
        )


class DecoderLayer(nn.Module):
    config: LlamaConfig
    has_cross_attention: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        eps = self.config.rms_norm_eps
        self.input_layernorm = RMSNorm(eps)
        self.self_attn = SelfAttention(self.config, self.dtype, self.attention_impl)
        self.post_attention_layernorm = RMSNorm(eps)
        self.mlp = MLP(self.config, self.dtype)
        if self.has_cross_attention:
            self.ln_cross_attn = RMSNorm(eps)
            self.crossattention = CrossAttention(self.config, self.dtype, self.attention_impl)

    def encoder_kv(self, encoder_states):
        return self.crossattention.encoder_kv(encoder_states)

    def __call__(self, x, rotary, mask, kv_cache, cache_index, cross_kv, encoder_valid, det):
        y, new_kv = self.self_attn(
            self.input_layernorm(x).astype(self.dtype), rotary, mask, kv_cache, cache_index, det
        )
        x = x + y
        if self.has_cross_attention:
            x = x + self.crossattention(
                self.ln_cross_attn(x).astype(self.dtype), cross_kv, encoder_valid
            )
        return x + self.mlp(self.post_attention_layernorm(x).astype(self.dtype)), new_kv


class LlamaLM(nn.Module):
    """A Llama-family causal LM; same call contract as ``GPT2LMHead`` (see its docstring).

    Attributes:
      config: the architecture.
      dtype: compute dtype (float32 or bfloat16); parameters are always float32.
      cross_attention_every: 0 for the plain LM; n adds cross-attention to blocks
        ``n-1, 2n-1, ...``.
      attention_impl: passed to ``jax.nn.dot_product_attention`` (None, "xla", "cudnn").
    """

    config: LlamaConfig
    dtype: Any = jnp.float32
    cross_attention_every: int = 0
    attention_impl: str | None = None

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02)
        )
        self.layers = [
            DecoderLayer(
                cfg,
                has_cross_attention(self.cross_attention_every, i),
                self.dtype,
                self.attention_impl,
                name=f"layers_{i}",
            )
            for i in range(cfg.num_hidden_layers)
        ]
        self.norm = RMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, self.dtype, "lm_head")

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        inputs: DecoderInputs | None = None,
        *,
        position_ids: jax.Array | None = None,
        cache: dict[str, Any] | None = None,
        cache_index: jax.Array | int = 0,
        deterministic: bool = True,
        return_hidden: bool = False,
        last_only: bool = False,
    ):
        """Logits ``[batch, prefix + seq, vocab]`` (float32), or ``(logits, cache)`` with a cache.

        Arguments as for ``GPT2LMHead`` (``return_hidden``: also the states after ``norm``;
        ``last_only``: the last position's logits alone);
        masks and positions as :func:`research.models.decoder_inputs.decoder_entry` reads them.
        """
        cfg = self.config
        inputs = DecoderInputs() if inputs is None else inputs
        n_slots = None if cache is None else cache["self"][0][0].shape[2]
        x, key_valid, key_positions, position_ids = decoder_entry(
            self.embed_tokens(input_ids), attention_mask, inputs, n_slots, cache_index, position_ids
        )
        rotary = rotary_angles(cfg, position_ids)
        full_mask = causal_mask(key_valid, x.shape[1], cache_index if cache is not None else 0)
        masks = {False: full_mask}
        if cfg.sliding_window is not None:
            distance = position_ids[:, :, None] - key_positions[:, None, :]
            masks[True] = full_mask & (distance < cfg.sliding_window)[:, None]
        cross_kv = cross_attention_kv(self.layers, self.cross_attention_every, inputs, cache)
        new_self = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(
                x,
                rotary,
                masks[cfg.uses_sliding_window(i)],
                None if cache is None else cache["self"][i],
                cache_index,
                None if cross_kv is None else cross_kv[i],
                inputs.encoder_mask,
                deterministic,
            )
            new_self.append(kv)
        x = self.norm(x).astype(self.dtype)
        head_input = x[:, -1:] if last_only else x
        if cfg.tie_word_embeddings:
            logits = tied_logits(self.embed_tokens, head_input, self.dtype)
        else:
            logits = self.lm_head(head_input).astype(jnp.float32)
        if cache is None:
            return (logits, x) if return_hidden else logits
        return logits, {"self": new_self, "cross": cross_kv}


def _special_ids(config: LlamaConfig) -> tuple[int, int, int]:
    """(bos, eos, pad): EOS stands in for a missing BOS or pad (research/data/tokenizers.py);
    of several EOS ids the first is the one generated rows end with."""
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, tuple | list) else eos
    bos = eos if config.bos_token_id is None else config.bos_token_id
    return bos, eos, eos if config.pad_token_id is None else config.pad_token_id


for _model_type, _config_cls in CONFIGS.items():
    families.register(
        families.DecoderFamily(
            model_type=_model_type,
            config_cls=_config_cls,
            module_cls=LlamaLM,
            hf=families.HFConversion(
                hf_table,
                lambda c: c.num_hidden_layers,
                save_prefix="",
                strip_prefixes=(),
                buffers=r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
                tied=(("lm_head.weight", "model.embed_tokens.weight"),),
            ),
            init_cache=init_cache,
            reorder_cache=families.reorder_self_cache,
            position_limit=lambda c: c.max_position_embeddings,
            hidden_size=lambda c: c.hidden_size,
            special_ids=_special_ids,
            lora_targets=(r"self_attn/[qkvo]_proj",),
        )
    )
