"""DistilBERT encoder in Flax linen: BERT's blocks under other names, no token types, no pooler.

A DistilBERT block computes exactly a BERT layer (post-LayerNorm attention, then a GELU MLP),
so the network reuses ``research/models/bert.py``'s ``Encoder`` and :data:`HF_TABLE` maps
DistilBERT's names (``transformer.layer.0.attention.q_lin``) onto it
(``transformer/layer_0/attention/self/query``). The embeddings are word + learned position
(DistilBERT's optional sinusoidal table is stored in the checkpoint like any other).
There is no pooler: ``pooler_output`` is the first token's final state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models import families
from research.models.attention import padding_mask
from research.models.bert import ACTIVATIONS, LORA_TARGETS, BertConfig, BertOutput, Encoder

# (Hugging Face name, Flax path, layout); torch Linear weights are transposed.
# fmt: off
HF_TABLE = (
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", "keep"),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", "keep"),
    ("embeddings.LayerNorm.weight", "embeddings/LayerNorm/scale", "keep"),
    ("embeddings.LayerNorm.bias", "embeddings/LayerNorm/bias", "keep"),
    ("transformer.layer.{i}.attention.q_lin.weight", "transformer/layer_{i}/attention/self/query/kernel", "transpose"),
    ("transformer.layer.{i}.attention.q_lin.bias", "transformer/layer_{i}/attention/self/query/bias", "keep"),
    ("transformer.layer.{i}.attention.k_lin.weight", "transformer/layer_{i}/attention/self/key/kernel", "transpose"),
    ("transformer.layer.{i}.attention.k_lin.bias", "transformer/layer_{i}/attention/self/key/bias", "keep"),
    ("transformer.layer.{i}.attention.v_lin.weight", "transformer/layer_{i}/attention/self/value/kernel", "transpose"),
    ("transformer.layer.{i}.attention.v_lin.bias", "transformer/layer_{i}/attention/self/value/bias", "keep"),
    ("transformer.layer.{i}.attention.out_lin.weight", "transformer/layer_{i}/attention/output/dense/kernel", "transpose"),
    ("transformer.layer.{i}.attention.out_lin.bias", "transformer/layer_{i}/attention/output/dense/bias", "keep"),
    ("transformer.layer.{i}.sa_layer_norm.weight", "transformer/layer_{i}/attention/output/LayerNorm/scale", "keep"),
    ("transformer.layer.{i}.sa_layer_norm.bias", "transformer/layer_{i}/attention/output/LayerNorm/bias", "keep"),
    ("transformer.layer.{i}.ffn.lin1.weight", "transformer/layer_{i}/intermediate/dense/kernel", "transpose"),
    ("transformer.layer.{i}.ffn.lin1.bias", "transformer/layer_{i}/intermediate/dense/bias", "keep"),
    ("transformer.layer.{i}.ffn.lin2.weight", "transformer/layer_{i}/output/dense/kernel", "transpose"),
    ("transformer.layer.{i}.ffn.lin2.bias", "transformer/layer_{i}/output/dense/bias", "keep"),
    ("transformer.layer.{i}.output_layer_norm.weight", "transformer/layer_{i}/output/LayerNorm/scale", "keep"),
    ("transformer.layer.{i}.output_layer_norm.bias", "transformer/layer_{i}/output/LayerNorm/bias", "keep"),
)
# fmt: on


@dataclasses.dataclass(frozen=True)
class DistilBertConfig:
    """The fields of Hugging Face's ``DistilBertConfig`` that change the computation."""

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    pad_token_id: int = 0

    model_type = "distilbert"
    checks = families.FieldChecks(
        choices=(("activation", ACTIVATIONS),),
        positive=(
            "vocab_size",
            "max_position_embeddings",
            "n_layers",
            "n_heads",
            "dim",
            "hidden_dim",
        ),
        divisible=(("dim", "n_heads"),),
        probabilities=("dropout", "attention_dropout"),
    )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> DistilBertConfig:
        return families.config_from_dict(cls, raw, source, skip_none=True)

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "distilbert",
            "architectures": ["DistilBertModel"],
            **dataclasses.asdict(self),
        }

    @property
    def hidden_size(self) -> int:
        return self.dim

    def as_bert(self) -> BertConfig:
        """The BERT config whose layers compute DistilBERT's blocks (LayerNorm eps 1e-12)."""
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            intermediate_size=self.hidden_dim,
            hidden_act=self.activation,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.attention_dropout,
            max_position_embeddings=self.max_position_embeddings,
            layer_norm_eps=1e-12,
            pad_token_id=self.pad_token_id,
        )


class Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, position_ids, deterministic):
        cfg, init = self.config, nn.initializers.normal(0.02)
        words = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word_embeddings"
        )
        positions = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=init,
            name="position_embeddings",
        )
        x = words(input_ids) + positions(position_ids)
        x = nn.LayerNorm(cfg.layer_norm_eps, dtype=jnp.float32, name="LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class DistilBertEncoder(nn.Module):
    """``apply(params, input_ids, attention_mask)`` -> :class:`BertOutput` (``[batch, seq, dim]``
    states; ``pooler_output`` is the first token's state).

    ``token_type_ids`` is accepted and ignored (DistilBERT has none), so every encoder is
    called alike.
    """

    config: DistilBertConfig
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
        bert = self.config.as_bert()
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if position_ids is None:
            position_ids = bert.position_ids(attention_mask)
        x = Embeddings(bert, name="embeddings")(input_ids, position_ids, deterministic)
        x = Encoder(bert, self.dtype, name="transformer")(
            x.astype(self.dtype), padding_mask(attention_mask), deterministic
        )
        x = x.astype(jnp.float32)
        return BertOutput(x, x[:, 0])


FAMILY = families.register(
    families.EncoderFamily(
        model_type="distilbert",
        config_cls=DistilBertConfig,
        module_cls=DistilBertEncoder,
        hf=families.HFConversion(
            HF_TABLE,
            lambda c: c.n_layers,
            save_prefix="",
            strip_prefixes=("distilbert.",),
            buffers=r"embeddings\.position_ids",
        ),
        position_limit=lambda c: c.max_position_embeddings,
        hidden_size=lambda c: c.hidden_size,
        lora_targets=LORA_TARGETS,
    )
)
