"""Configuration of the Llama-family decoders and their Hugging Face conversion.

:class:`LlamaConfig` reads and writes the ``config.json`` of Hugging Face's ``llama``, ``qwen2``
and ``mistral`` model types (transformers 5's ``rope_parameters`` or the older ``rope_theta`` +
``rope_scaling``); :func:`hf_table` names every checkpoint tensor. The network is
``research/models/llama.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from research.models import families
from research.models.activations import ACTIVATIONS

MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")
# Written to config.json as they are.
_PLAIN_HF_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "bos_token_id",
    "pad_token_id",
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of Hugging Face's ``LlamaConfig``/``Qwen2Config``/``MistralConfig`` that
    change the computation. Rotary settings are flattened from ``rope_parameters`` (or the
    older ``rope_theta`` + ``rope_scaling``); ``sliding_layers[i]`` says whether layer ``i``
    uses the sliding window. One subclass per model type (:data:`CONFIGS`)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    model_type = "llama"
    checks = families.FieldChecks(
        choices=(("hidden_act", ACTIVATIONS),),
        positive=(
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
        ),
        divisible=(("num_attention_heads", "num_key_value_heads"),),
        probabilities=("attention_dropout",),
    )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> LlamaConfig:
        model_type = cls.model_type
        families.check_model_type(cls, raw, source)
        values = families.known_fields(cls, raw, skip_none=True)
        heads = values.get("num_attention_heads", cls.num_attention_heads)
        values.setdefault("num_key_value_heads", heads)
        values.setdefault("head_dim", values.get("hidden_size", cls.hidden_size) // heads)
        values.pop("sliding_window", None)
        if isinstance(raw.get("eos_token_id"), list):
            values["eos_token_id"] = tuple(raw["eos_token_id"])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            values.setdefault(key, None)  # None in the file means none, not our default
        if model_type == "llama":
            values["qkv_bias"] = values["o_bias"] = bool(raw.get("attention_bias", False))
        else:
            values.update(qkv_bias=model_type == "qwen2", o_bias=False, mlp_bias=False)
        values.update(_rope_fields(raw, source))
        values.update(_sliding_fields(raw, model_type, values.get("num_hidden_layers", 32)))
        config = cls(**values)
        families.check_config(config, source)
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _PLAIN_HF_FIELDS}
        eos = self.eos_token_id
        out.update(
            architectures=[MODEL_TYPES[self.model_type]],
            eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
            rope_parameters=self._rope_parameters(),
        )
        if self.model_type == "llama":
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        else:
            out.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
                layer_types=[
                    "sliding_attention" if s else "full_attention" for s in self.sliding_layers
                ],
            )
        return out

    def _rope_parameters(self) -> dict[str, Any]:
        out = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            out["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        return out

    def uses_sliding_window(self, layer_idx: int) -> bool:
        return self.sliding_window is not None and self.sliding_layers[layer_idx]


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    model_type = "qwen2"


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    model_type = "mistral"


CONFIGS: dict[str, type[LlamaConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
}


def _rope_fields(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Rotary settings from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (older files; ``type`` is the old spelling of ``rope_type``)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: rope_type={rope_type!r} is not supported; valid: {ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    out = {
        "rope_type": rope_type,
        "rope_theta": float(params.get("rope_theta", raw.get("rope_theta", 10000.0))),
    }
    if rope_type != "default":
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
            ),
        )
    return out


def _sliding_fields(raw: dict[str, Any], model_type: str, n_layers: int) -> dict[str, Any]:
    """Mistral slides every layer when ``sliding_window`` is set; Qwen2 only with
    ``use_sliding_window``, on the layers ``layer_types`` marks (default: from
    ``max_window_layers`` on); Llama never."""
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        window = None
    if model_type == "llama" or window is None:
        return {"sliding_window": None, "sliding_layers": (False,) * n_layers}
    if model_type == "mistral":
        return {"sliding_window": int(window), "sliding_layers": (True,) * n_layers}
    first = raw.get("max_window_layers", 28)
    types = raw.get("layer_types") or [
        "sliding_attention" if i >= first else "full_attention" for i in range(n_layers)
    ]
    return {
        "sliding_window": int(window),
        "sliding_layers": tuple(t == "sliding_attention" for t in types),
    }


def hf_table(config: LlamaConfig) -> tuple[tuple[str, str, str], ...]:
    """Checkpoint names: (Hugging Face name, Flax path, layout), ``{i}`` the layer index.

    Layouts as in ``research/models/hf.py``: torch ``Linear`` weights are transposed.
    Optional rows (biases, an untied head) follow the config.
    """
    rows = [("model.embed_tokens.weight", "embed_tokens/embedding", "keep")]
    layer = "model.layers.{i}."
    for proj, bias in (
        ("q_proj", config.qkv_bias),
        ("k_proj", config.qkv_bias),
        ("v_proj", config.qkv_bias),
        ("o_proj", config.o_bias),
    ):
        rows.append(
            (
                f"{layer}self_attn.{proj}.weight",
                f"layers_{{i}}/self_attn/{proj}/kernel",
                "transpose",
            )
        )
        if bias:
            rows.append(
                (f"{layer}self_attn.{proj}.bias", f"layers_{{i}}/self_attn/{proj}/bias", "keep")
            )
    for proj in ("gate_proj", "up_proj", "down_proj"):
        rows.append((f"{layer}mlp.{proj}.weight", f"layers_{{i}}/mlp/{proj}/kernel", "transpose"))
        if config.mlp_bias:
            rows.append((f"{layer}mlp.{proj}.bias", f"layers_{{i}}/mlp/{proj}/bias", "keep"))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        rows.append((f"{layer}{norm}.weight", f"layers_{{i}}/{norm}/weight", "keep"))
    rows.append(("model.norm.weight", "norm/weight", "keep"))
    if not config.tie_word_embeddings:
        rows.append(("lm_head.weight", "lm_head/kernel", "transpose"))
    return tuple(rows)
