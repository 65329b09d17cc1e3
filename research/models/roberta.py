"""RoBERTa-style encoders (``roberta``, ``xlm-roberta``): BERT's network, other conventions.

The layers and parameter names are BERT's (``research/models/bert.py``, one conversion table
for both); three things differ, all in the config:

* position ids start after the padding id: a real token at index ``t`` of its row (counting
  real tokens only) takes position ``pad_token_id + 1 + t``. transformers derives this from
  ``input_ids != pad_token_id``; we derive it from the attention mask, so it also holds for
  batches padded with another id.
* a single token type (``type_vocab_size=1``): every token gets type 0.
* LayerNorm epsilon 1e-5 and the padding id 1 by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from research.models import families
from research.models.bert import BERT_TABLE, LORA_TARGETS, BertConfig, BertEncoder

ARCHITECTURES = {"roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """The fields of ``RobertaConfig``/``XLMRobertaConfig`` that change the computation."""

    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    model_type = "roberta"

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "architectures": [ARCHITECTURES[self.model_type]],
            **dataclasses.asdict(self),
        }

    def position_ids(self, attention_mask: jax.Array) -> jax.Array:
        """``[batch, seq]``: real tokens count up from ``pad_token_id + 1``; padding takes
        ``pad_token_id`` (its embedding row, which transformers never trains)."""
        mask = attention_mask.astype(jnp.int32)
        return jnp.cumsum(mask, axis=1) * mask + self.pad_token_id


@dataclasses.dataclass(frozen=True)
class XLMRobertaConfig(RobertaConfig):
    vocab_size: int = 250002

    model_type = "xlm-roberta"


CONFIGS: dict[str, type[RobertaConfig]] = {
    "roberta": RobertaConfig,
    "xlm-roberta": XLMRobertaConfig,
}


for _model_type, _config_cls in CONFIGS.items():
    families.register(
        families.EncoderFamily(
            model_type=_model_type,
            config_cls=_config_cls,
            module_cls=BertEncoder,
            hf=families.HFConversion(
                BERT_TABLE,
                lambda c: c.num_hidden_layers,
                save_prefix="",
                strip_prefixes=("roberta.",),
                buffers=r"embeddings\.(position_ids|token_type_ids)",
            ),
            position_limit=lambda c: c.max_position_embeddings,
            hidden_size=lambda c: c.hidden_size,
            lora_targets=LORA_TARGETS,
        )
    )
