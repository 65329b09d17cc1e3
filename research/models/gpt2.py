"""GPT-2 in Flax linen, written to be read top to bottom (after nanoGPT).

One module, :class:`GPT2LMHead`, covers every GPT-2 size (distilgpt2, gpt2 ... gpt2-xl):
learned positions, pre-LayerNorm blocks, ``gelu_new``, an LM head tied to the token
embeddings. Three hooks, the fields of ``DecoderInputs``, serve the conditioning methods
(``research/models/conditioning.py``):

* ``prefix_embeds`` ``[batch, prefix, d_model]`` are prepended to the token embeddings
  (soft prompts: ``prefix``, ``id_prompt``); they take the first positions.
* ``embed_offset`` ``[batch, d_model]`` is added to every token embedding (``additive``).
* ``cross_attention_every=n`` adds a cross-attention sublayer to every n-th block, attending
  to ``encoder_states`` ``[batch, enc_len, encoder_dim]`` (``cross_attention``). Its output
  projection starts at zero, so a pretrained decoder is unchanged until it learns.

Decoding uses an explicit KV cache (a pytree from :func:`init_cache`), never hidden mutable
state: ``apply(..., cache=cache, cache_index=i)`` writes the new keys/values at positions
``[i, i + seq)`` and returns ``(logits, cache)``.

Parameter names follow Hugging Face's (``h_3/attn/c_attn/kernel`` <-> ``h.3.attn.c_attn.weight``)
so the checkpoint table (:data:`GPT2_TABLE`) stays one line per tensor. The config is
``research/models/gpt2_config.py``; the module ends with the family's registration
(``research/models/families.py``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models import families
from research.models.activations import ACTIVATIONS
from research.models.attention import attend, causal_mask, padding_mask
from research.models.decoder_inputs import (
    DecoderInputs,
    cross_attention_kv,
    decoder_entry,
    has_cross_attention,
)
from research.models.families import KEEP
from research.models.gpt2_config import GPT2Config
from research.models.precision import tied_logits


def init_cache(
    config: GPT2Config, batch: int, max_len: int, dtype: Any = jnp.float32
) -> dict[str, Any]:
    """Empty self-attention cache: per layer keys/values ``[batch, heads, max_len, head_dim]``.

    Heads come before positions because that is how the attention products read them: stored
    ``[batch, max_len, heads, head_dim]``, XLA copied each layer's whole cache into that order
    at every decoding step (GPT-2 124M, greedy, batch 16, 2 CPU cores: 8% slower decoding,
    1.5x slower on a busy machine).

    ``cross`` is filled by the prefill call when the decoder has cross-attention (the
    encoder's keys/values are computed once per sequence, not per decoding step).
    """
    shape = (batch, config.n_head, max_len, config.head_dim)
    return {
        "self": [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layer)],
        "cross": None,
    }


def _dense(features: int, dtype: Any, name: str, zero: bool = False, std: float = 0.02):
    init = nn.initializers.zeros if zero else nn.initializers.normal(std)
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=init, name=name)


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    # Statistics in float32 even under bfloat16 compute: cheap and avoids drift.
    return nn.LayerNorm(config.layer_norm_epsilon, dtype=jnp.float32, name=name)


def _heads(x: jax.Array, n_head: int) -> jax.Array:
    """``[batch, seq, d_model]`` -> ``[batch, seq, heads, head_dim]``."""
    return x.reshape(*x.shape[:2], n_head, x.shape[-1] // n_head)


def _merge_heads(x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:2], -1)


class SelfAttention(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x, key_valid, kv_cache, cache_index, deterministic):
        """x ``[batch, seq, d_model]``; key_valid ``[batch, kv_len]`` -> (y, updated cache or None)."""
        cfg = self.config
        q, k, v = jnp.split(_dense(3 * cfg.n_embd, self.dtype, "c_attn")(x), 3, axis=-1)
        q, k, v = (_heads(t, cfg.n_head) for t in (q, k, v))
        offset, new_kv = 0, None
        if kv_cache is not None:
            # The cache is [batch, heads, max_len, head_dim]; see init_cache.
            offset = cache_index
            new_kv = tuple(
                jax.lax.dynamic_update_slice_in_dim(
                    stored, t.transpose(0, 2, 1, 3).astype(stored.dtype), offset, 2
                )
                for stored, t in zip(kv_cache, (k, v), strict=True)
            )
            k, v = (t.transpose(0, 2, 1, 3) for t in new_kv)
        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= cfg.head_dim**0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= self.layer_idx + 1
        use_dropout = not deterministic and cfg.attn_pdrop > 0
        y = attend(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            causal_mask(key_valid, x.shape[1], offset),
            scale=scale,
            dropout_rate=cfg.attn_pdrop,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            implementation=self.attention_impl,
        )
        y = _dense(cfg.n_embd, self.dtype, "c_proj", std=0.02 / (2 * cfg.n_layer) ** 0.5)(
            _merge_heads(y)
        )
        return y, new_kv


class CrossAttention(nn.Module):
    """Decoder tokens attend to encoder states; ``c_proj`` starts at zero (a no-op at init)."""

    config: GPT2Config
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        cfg = self.config
        self.q_attn = _dense(cfg.n_embd, self.dtype, "q_attn")
        self.c_attn = _dense(2 * cfg.n_embd, self.dtype, "c_attn")
        self.c_proj = _dense(cfg.n_embd, self.dtype, "c_proj", zero=True)

    def encoder_kv(self, encoder_states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[batch, enc_len, encoder_dim]`` -> keys, values ``[batch, enc_len, heads, head_dim]``."""
        k, v = jnp.split(self.c_attn(encoder_states), 2, axis=-1)
        return _heads(k, self.config.n_head), _heads(v, self.config.n_head)

    def __call__(self, x, kv, encoder_valid):
        q = _heads(self.q_attn(x), self.config.n_head)
        k, v = kv
        y = attend(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            padding_mask(encoder_valid),
            scale=self.config.head_dim**-0.5,
            implementation=self.attention_impl,
        )
        return self.c_proj(_merge_heads(y))


class MLP(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = ACTIVATIONS[cfg.activation_function](_dense(cfg.inner_dim, self.dtype, "c_fc")(x))
        return _dense(cfg.n_embd, self.dtype, "c_proj", std=0.02 / (2 * cfg.n_layer) ** 0.5)(h)


class Block(nn.Module):
    config: GPT2Config
    layer_idx: int
    has_cross_attention: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    def setup(self):
        cfg = self.config
        self.ln_1 = _layer_norm(cfg, "ln_1")
        self.attn = SelfAttention(cfg, self.layer_idx, self.dtype, self.attention_impl)
        self.ln_2 = _layer_norm(cfg, "ln_2")
        self.mlp = MLP(cfg, self.dtype)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        if self.has_cross_attention:
            self.ln_cross_attn = _layer_norm(cfg, "ln_cross_attn")
            self.crossattention = CrossAttention(cfg, self.dtype, self.attention_impl)

    def encoder_kv(self, encoder_states):
        return self.crossattention.encoder_kv(encoder_states)

    def __call__(self, x, key_valid, kv_cache, cache_index, cross_kv, encoder_valid, deterministic):
        y, new_kv = self.attn(
            self.ln_1(x).astype(self.dtype), key_valid, kv_cache, cache_index, deterministic
        )
        x = x + self.resid_dropout(y, deterministic=deterministic)
        if self.has_cross_attention:
            y = self.crossattention(
                self.ln_cross_attn(x).astype(self.dtype), cross_kv, encoder_valid
            )
            x = x + self.resid_dropout(y, deterministic=deterministic)
        y = self.mlp(self.ln_2(x).astype(self.dtype))
        return x + self.resid_dropout(y, deterministic=deterministic), new_kv


class GPT2LMHead(nn.Module):
    """GPT-2 with a tied LM head.

    Attributes:
      config: the architecture.
      dtype: compute dtype (float32 or bfloat16); parameters are always float32.
      cross_attention_every: 0 for plain GPT-2; n adds cross-attention to blocks
        ``n-1, 2n-1, ...`` (1 = every block).
      attention_impl: passed to ``jax.nn.dot_product_attention`` (None, "xla", "cudnn").
    """

    config: GPT2Config
    dtype: Any = jnp.float32
    cross_attention_every: int = 0
    attention_impl: str | None = None

    def setup(self):
        cfg = self.config
        embed_init = nn.initializers.normal(0.02)
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=embed_init, name="wte")
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=embed_init, name="wpe")
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = [
            Block(
                cfg,
                i,
                has_cross_attention(self.cross_attention_every, i),
                self.dtype,
                self.attention_impl,
                name=f"h_{i}",
            )
            for i in range(cfg.n_layer)
        ]
        self.ln_f = _layer_norm(cfg, "ln_f")

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

        Args:
          input_ids: ``[batch, seq]`` token ids.
          attention_mask: ``[batch, seq]`` 1 for tokens, 0 for padding (left or right). With a
            cache it covers every cache slot instead: ``[batch, max_len]``.
          position_ids: ``[batch, prefix + seq]``; by default they follow the mask (padding
            takes no position), so left-padded prompts start at position 0.
          inputs: the conditioning hooks (:class:`DecoderInputs`): ``prefix_embeds``
            ``[batch, prefix, d_model]`` placed before the tokens; ``embed_offset``
            ``[batch, d_model]`` added to every token embedding (not the prefix);
            ``encoder_states``/``encoder_mask`` ``[batch, enc_len, encoder_dim]`` and
            ``[batch, enc_len]`` for the cross-attention blocks.
          cache, cache_index: decoding state from :func:`init_cache`; this call's tokens
            (after any prefix) occupy cache slots ``[cache_index, cache_index + prefix + seq)``.
          deterministic: False enables dropout (needs a ``dropout`` rng).
          return_hidden: without a cache, return ``(logits, hidden)``, ``hidden`` the final
            hidden states ``[batch, prefix + seq, d_model]`` (after ``ln_f``).
          last_only: logits of the last position alone, ``[batch, 1, vocab]``.
        """
        inputs = DecoderInputs() if inputs is None else inputs
        n_slots = None if cache is None else cache["self"][0][0].shape[2]
        entry = decoder_entry(
            self.wte(input_ids), attention_mask, inputs, n_slots, cache_index, position_ids
        )
        x = self.drop(entry.x + self.wpe(entry.position_ids), deterministic=deterministic)
        cross_kv = cross_attention_kv(self.h, self.cross_attention_every, inputs, cache)
        new_self = []
        for i, block in enumerate(self.h):
            x, kv = block(
                x,
                entry.key_valid,
                None if cache is None else cache["self"][i],
                cache_index,
                None if cross_kv is None else cross_kv[i],
                inputs.encoder_mask,
                deterministic,
            )
            new_self.append(kv)
        x = self.ln_f(x)
        logits = tied_logits(self.wte, x[:, -1:] if last_only else x, self.dtype)
        if cache is None:
            return (logits, x) if return_hidden else logits
        return logits, {"self": new_self, "cross": cross_kv}


# fmt: off
GPT2_TABLE = (
    ("wte.weight", "wte/embedding", KEEP),
    ("wpe.weight", "wpe/embedding", KEEP),
    ("h.{i}.ln_1.weight", "h_{i}/ln_1/scale", KEEP),
    ("h.{i}.ln_1.bias", "h_{i}/ln_1/bias", KEEP),
    ("h.{i}.attn.c_attn.weight", "h_{i}/attn/c_attn/kernel", KEEP),  # Conv1D
    ("h.{i}.attn.c_attn.bias", "h_{i}/attn/c_attn/bias", KEEP),
    ("h.{i}.attn.c_proj.weight", "h_{i}/attn/c_proj/kernel", KEEP),  # Conv1D
    ("h.{i}.attn.c_proj.bias", "h_{i}/attn/c_proj/bias", KEEP),
    ("h.{i}.ln_2.weight", "h_{i}/ln_2/scale", KEEP),
    ("h.{i}.ln_2.bias", "h_{i}/ln_2/bias", KEEP),
    ("h.{i}.mlp.c_fc.weight", "h_{i}/mlp/c_fc/kernel", KEEP),  # Conv1D
    ("h.{i}.mlp.c_fc.bias", "h_{i}/mlp/c_fc/bias", KEEP),
    ("h.{i}.mlp.c_proj.weight", "h_{i}/mlp/c_proj/kernel", KEEP),  # Conv1D
    ("h.{i}.mlp.c_proj.bias", "h_{i}/mlp/c_proj/bias", KEEP),
    ("ln_f.weight", "ln_f/scale", KEEP),
    ("ln_f.bias", "ln_f/bias", KEEP),
)
# fmt: on


def _folder_tokenizer(folder: Any) -> Any:
    """A GPT-2 folder without tokenizer files: its BPE files if it has them, else the packaged
    BPE (a checkpoint saved without its tokenizer)."""
    from research.data import tokenizers  # transformers: loaded only when a tokenizer is wanted

    return tokenizers.gpt2_tokenizer(folder if tokenizers.has_gpt2_bpe(folder) else None)


FAMILY = families.register(
    families.DecoderFamily(
        model_type="gpt2",
        config_cls=GPT2Config,
        module_cls=GPT2LMHead,
        hf=families.HFConversion(
            GPT2_TABLE,
            lambda c: c.n_layer,
            save_prefix="transformer.",
            strip_prefixes=("transformer.",),
            buffers=r"h\.\d+\.attn\.(bias|masked_bias)",
            tied=(("lm_head.weight", "wte.weight"),),
        ),
        init_cache=init_cache,
        reorder_cache=families.reorder_self_cache,
        position_limit=lambda c: c.n_positions,
        hidden_size=lambda c: c.n_embd,
        # GPT-2 has no pad token: <|endoftext|> is BOS, EOS and pad (research/data/tokenizers.py).
        special_ids=lambda c: (c.bos_token_id, c.eos_token_id, c.eos_token_id),
        lora_targets=("attn/c_attn", "attn/c_proj"),  # fused q/k/v, and o
        folder_tokenizer=_folder_tokenizer,
    )
)
