"""Decoding settings (``sampling.*`` in the central config) and their validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from research.models.decode_weights import WEIGHTS_DTYPES

SAMPLING_CHOICES: dict[str, tuple] = {
    "strategy": ("greedy", "sample", "beam"),
    "weights_dtype": tuple(WEIGHTS_DTYPES),
}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; the central config holds them as ``sampling.<field>``."""

    strategy: str = "greedy"
    temperature: float = 1.0  # sample: logits are divided by it
    top_k: int = 0  # sample: keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # sample: keep the most likely tokens holding top_p of the mass (1 = off)
    num_beams: int = 4  # beam
    length_penalty: float = 1.0  # beam: finished score = sum logprob / new_tokens ** this
    no_repeat_ngram_size: int = 0  # 0 = off
    # > 1 discourages every token already in the prompt or the output (Hugging Face's
    # RepetitionPenaltyLogitsProcessor: positive logits / penalty, negative x penalty); 1 = off.
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # EOS is forbidden before this many new tokens
    max_new_tokens: int = 20  # PEPLER decodes 20 tokens
    seed: int = 0  # sample
    batch_size: int = 64  # rows per compiled call (rounded up to a multiple of the devices)
    # The decoder's weights while decoding (research/models/decode_weights.py): bfloat16 halves
    # the bytes each step reads; products take bfloat16 operands and accumulate in float32.
    weights_dtype: str = "float32"

    def __post_init__(self):
        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"sampling.{key}={getattr(self, key)!r}: {rule}")

        for key, choices in SAMPLING_CHOICES.items():
            if getattr(self, key) not in choices:
                raise bad(key, f"choose one of {', '.join(choices)}")
        if not self.temperature > 0:
            raise bad("temperature", "must be > 0")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        for key in ("top_k", "no_repeat_ngram_size", "min_new_tokens", "seed"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        for key in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise bad(key, "must be >= 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise bad("min_new_tokens", f"exceeds sampling.max_new_tokens={self.max_new_tokens}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> SamplingConfig:
        """From the ``sampling`` ConfigDict (or a dict); unknown keys are an error."""
        values = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"sampling.{unknown[0]} is not a setting; valid: {sorted(fields)}")
        return cls(**values)


def sampling_config() -> ml_collections.ConfigDict:
    """The defaults of :class:`SamplingConfig` as a ConfigDict (for ``--config.sampling.x=y``)."""
    return ml_collections.ConfigDict(dataclasses.asdict(SamplingConfig()))


def as_sampling_config(cfg) -> SamplingConfig:
    """``cfg`` as a :class:`SamplingConfig` (a ConfigDict or dict is validated)."""
    return cfg if isinstance(cfg, SamplingConfig) else SamplingConfig.from_config(cfg)
