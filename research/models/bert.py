"""BERT encoder in Flax linen (BERT, MiniLM and other ``BertConfig`` models).

Post-LayerNorm blocks as in the original BERT. Parameter names follow Hugging Face's
(``encoder/layer_0/attention/self/query`` <-> ``encoder.layer.0.attention.self.query``) so the
checkpoint table in ``research/models/hf.py`` stays one line per tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models import families
from research.models.activations import ACTIVATIONS
from research.models.attention import attend, padding_mask
from research.models.families import KEEP, TRANSPOSE


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of Hugging Face's ``BertConfig`` that change the computation."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    model_type = "bert"
    checks = families.FieldChecks(
        choices=(("hidden_act", ACTIVATIONS),),
        positive=(
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ),
        divisible=(("hidden_size", "num_attention_heads"),),
        probabilities=("hidden_dropout_prob", "attention_probs_dropout_prob"),
    )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> BertConfig:
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"{source}: position_embedding_type={position_type!r} is not supported; "
                "valid: ['absolute']"
            )
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise ValueError(f"{source}: only BERT encoders are supported (is_decoder=false)")
        return families.config_from_dict(cls, raw, source)

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": "bert", "architectures": ["BertModel"], **dataclasses.asdict(self)}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def position_ids(self, attention_mask: jax.Array) -> jax.Array:
        """Default position ids ``[batch, seq]``: 0, 1, ... from the first column (RoBERTa's
        differ: ``research/models/roberta.py``)."""
        return jnp.broadcast_to(jnp.arange(attention_mask.shape[1]), attention_mask.shape)


class BertOutput(NamedTuple):
    last_hidden_state: jax.Array  # [batch, seq, hidden]
    pooler_output: jax.Array  # [batch, hidden]


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(config.layer_norm_eps, dtype=jnp.float32, name=name)


class Embeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        x = (
            nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings")(
                input_ids
            )
            + nn.Embed(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                embedding_init=init,
                name="position_embeddings",
            )(position_ids)
            + nn.Embed(
                cfg.type_vocab_size,
                cfg.hidden_size,
                embedding_init=init,
                name="token_type_embeddings",
            )(token_type_ids)
        )
        x = _layer_norm(cfg, "LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic):
        cfg = self.config
        n = cfg.num_attention_heads

        def heads(name):
            y = _dense(cfg.hidden_size, self.dtype, name)(x)
            return y.reshape(*y.shape[:2], n, cfg.head_dim)

        use_dropout = not deterministic and cfg.attention_probs_dropout_prob > 0
        y = attend(
            heads("query"),
            heads("key"),
            heads("value"),
            mask,
            scale=cfg.head_dim**-0.5,
            dropout_rate=cfg.attention_probs_dropout_prob,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
        )
        return y.reshape(*y.shape[:2], cfg.hidden_size)


class DenseResidualNorm(nn.Module):
    """BERT's ``*Output`` sublayer: dense -> dropout -> LayerNorm(x + residual)."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic):
        y = _dense(self.config.hidden_size, self.dtype, "dense")(x)
        y = nn.Dropout(self.config.hidden_dropout_prob)(y, deterministic=deterministic)
        return _layer_norm(self.config, "LayerNorm")(y + residual)


class Attention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic):
        y = SelfAttention(self.config, self.dtype, name="self")(x, mask, deterministic)
        return DenseResidualNorm(self.config, self.dtype, name="output")(y, x, deterministic)


class Intermediate(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = _dense(self.config.intermediate_size, self.dtype, "dense")(x)
        return ACTIVATIONS[self.config.hidden_act](y)


class Layer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic):
        x = Attention(self.config, self.dtype, name="attention")(x, mask, deterministic)
        h = Intermediate(self.config, self.dtype, name="intermediate")(x)
        return DenseResidualNorm(self.config, self.dtype, name="output")(h, x, deterministic)


class Encoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic):
        for i in range(self.config.num_hidden_layers):
            x = Layer(self.config, self.dtype, name=f"layer_{i}")(x, mask, deterministic)
        return x


class BertEncoder(nn.Module):
    """``apply(params, input_ids, attention_mask)`` -> :class:`BertOutput`.

    Attributes:
      config: the architecture.
      dtype: compute dtype (float32 or bfloat16); parameters are always float32.
    """

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> BertOutput:
        """input_ids, attention_mask, token_type_ids: ``[batch, seq]``."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if position_ids is None:
            position_ids = self.config.position_ids(attention_mask)
        x = Embeddings(self.config, self.dtype, name="embeddings")(
            input_ids, token_type_ids, position_ids, deterministic
        )
        x = Encoder(self.config, self.dtype, name="encoder")(
            x.astype(self.dtype), padding_mask(attention_mask), deterministic
        )
        pooled = jnp.tanh(_dense(self.config.hidden_size, self.dtype, "pooler")(x[:, 0]))
        return BertOutput(x.astype(jnp.float32), pooled.astype(jnp.float32))


# fmt: off
BERT_TABLE = (
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", KEEP),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", KEEP),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding", KEEP),
    ("embeddings.LayerNorm.weight", "embeddings/LayerNorm/scale", KEEP),
    ("embeddings.LayerNorm.bias", "embeddings/LayerNorm/bias", KEEP),
    ("encoder.layer.{i}.attention.self.query.weight", "encoder/layer_{i}/attention/self/query/kernel", TRANSPOSE),
    ("encoder.layer.{i}.attention.self.query.bias", "encoder/layer_{i}/attention/self/query/bias", KEEP),
    ("encoder.layer.{i}.attention.self.key.weight", "encoder/layer_{i}/attention/self/key/kernel", TRANSPOSE),
    ("encoder.layer.{i}.attention.self.key.bias", "encoder/layer_{i}/attention/self/key/bias", KEEP),
    ("encoder.layer.{i}.attention.self.value.weight", "encoder/layer_{i}/attention/self/value/kernel", TRANSPOSE),
    ("encoder.layer.{i}.attention.self.value.bias", "encoder/layer_{i}/attention/self/value/bias", KEEP),
    ("encoder.layer.{i}.attention.output.dense.weight", "encoder/layer_{i}/attention/output/dense/kernel", TRANSPOSE),
    ("encoder.layer.{i}.attention.output.dense.bias", "encoder/layer_{i}/attention/output/dense/bias", KEEP),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "encoder/layer_{i}/attention/output/LayerNorm/scale", KEEP),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "encoder/layer_{i}/attention/output/LayerNorm/bias", KEEP),
    ("encoder.layer.{i}.intermediate.dense.weight", "encoder/layer_{i}/intermediate/dense/kernel", TRANSPOSE),
    ("encoder.layer.{i}.intermediate.dense.bias", "encoder/layer_{i}/intermediate/dense/bias", KEEP),
    ("encoder.layer.{i}.output.dense.weight", "encoder/layer_{i}/output/dense/kernel", TRANSPOSE),
    ("encoder.layer.{i}.output.dense.bias", "encoder/layer_{i}/output/dense/bias", KEEP),
    ("encoder.layer.{i}.output.LayerNorm.weight", "encoder/layer_{i}/output/LayerNorm/scale", KEEP),
    ("encoder.layer.{i}.output.LayerNorm.bias", "encoder/layer_{i}/output/LayerNorm/bias", KEEP),
    ("pooler.dense.weight", "pooler/kernel", TRANSPOSE),
    ("pooler.dense.bias", "pooler/bias", KEEP),
)
# fmt: on

# Attention q/k/v and its output projection (not the MLP's ``output/dense``).
LORA_TARGETS = ("attention/self/(query|key|value)", "attention/output/dense")

FAMILY = families.register(
    families.EncoderFamily(
        model_type="bert",
        config_cls=BertConfig,
        module_cls=BertEncoder,
        hf=families.HFConversion(
            BERT_TABLE,
            lambda c: c.num_hidden_layers,
            save_prefix="",
            strip_prefixes=("bert.",),
            buffers=r"embeddings\.position_ids",
        ),
        position_limit=lambda c: c.max_position_embeddings,
        hidden_size=lambda c: c.hidden_size,
        lora_targets=LORA_TARGETS,
    )
)
