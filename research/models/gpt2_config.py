"""Configuration of GPT-2 (``research/models/gpt2.py``): the fields of Hugging Face's
``GPT2Config`` that change the computation, read from and written to ``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any

from research.models import families
from research.models.activations import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of Hugging Face's ``GPT2Config`` that change the computation."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    model_type = "gpt2"
    checks = families.FieldChecks(
        choices=(("activation_function", ACTIVATIONS),),
        positive=("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"),
        divisible=(("n_embd", "n_head"),),
        probabilities=("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> GPT2Config:
        if raw.get("add_cross_attention"):
            raise ValueError(
                f"{source}: add_cross_attention=true checkpoints are not supported; "
                "cross-attention is added by the 'cross_attention' conditioning method"
            )
        return families.config_from_dict(cls, raw, source)

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            **dataclasses.asdict(self),
        }

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
