"""A conditioning method and a decoder family added from this file alone (no library edits):
they validate as config values, train through ``research train``'s loop, sample, and
round-trip through a checkpoint and a Hugging Face folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from research import sampling
from research.config import ConfigError, load_config, validate
from research.eval.evaluate import load_run
from research.models import conditioning as cond
from research.models import families, hf
from research.models.build import build_generator
from research.models.decoder_inputs import DecoderInputs
from research.models.families import KEEP, TRANSPOSE
from research.train import loop

TINY = Path(__file__).resolve().parent / "configs" / "tiny.py"
TOY_TYPE = "toy_bigram"


class ItemOffset(cond.ConditioningMethod):
    """``item_offset``: a learned vector per item, scaled, added to every token embedding."""

    d_model: int
    num_items: int
    scale: float

    method_name: ClassVar[str] = "item_offset"
    reads: ClassVar[tuple[str, ...]] = ("item",)
    hyperparameters: ClassVar[tuple[cond.Hyperparameter, ...]] = (
        cond.Hyperparameter(
            "item_offset_scale", 0.5, lambda v: isinstance(v, float) and v > 0, "must be > 0"
        ),
    )

    @classmethod
    def from_spec(cls, spec, dtype):
        return cls(spec.d_model, spec.num_items, spec.option("item_offset_scale"))

    @nn.compact
    def __call__(self, sources: cond.Sources) -> DecoderInputs:
        table = nn.Embed(self.num_items, self.d_model, name="table")
        return DecoderInputs(embed_offset=self.scale * table(sources.ids["item"]))


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 50257
    width: int = 8
    max_positions: int = 64
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    model_type = TOY_TYPE

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ToyConfig:
        return cls(**{f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw})

    def to_hf_dict(self) -> dict[str, Any]:
        return {"model_type": TOY_TYPE, **dataclasses.asdict(self)}


class ToyBigram(nn.Module):
    """A bigram LM: position t sees its own token, the offset hook and the mean of the prefix
    vectors (kept in the cache for the decoding steps). Logits ``[batch, prefix + seq, vocab]``."""

    config: ToyConfig
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(
        self, input_ids, attention_mask=None, inputs=None, *, cache=None, cache_index=0,
        deterministic=True, last_only=False,
    ):  # fmt: skip
        inputs = DecoderInputs() if inputs is None else inputs
        wte = nn.Embed(self.config.vocab_size, self.config.width, name="wte")
        x = wte(input_ids)
        if inputs.embed_offset is not None:
            x = x + inputs.embed_offset[:, None]
        context = jnp.zeros((x.shape[0], self.config.width))
        if inputs.prefix_embeds is not None:
            context = inputs.prefix_embeds.mean(1)
            x = jnp.concatenate([inputs.prefix_embeds, x], axis=1)
        elif cache is not None:
            context = cache["context"]
        x = x[:, -1:] if last_only else x
        logits = wte.attend(jnp.tanh(nn.Dense(self.config.width, name="mix")(x + context[:, None])))
        return logits if cache is None else (logits, {"context": context})


def _toy_family() -> families.DecoderFamily:
    return families.DecoderFamily(
        model_type=TOY_TYPE,
        config_cls=ToyConfig,
        module_cls=ToyBigram,
        hf=families.HFConversion(
            (
                ("wte.weight", "wte/embedding", KEEP),
                ("mix.weight", "mix/kernel", TRANSPOSE),
                ("mix.bias", "mix/bias", KEEP),
            ),
            num_layers=lambda c: 0,
            save_prefix="",
            strip_prefixes=(),
            buffers=r"$^",
        ),
        init_cache=lambda c, batch, max_len, dtype: {"context": jnp.zeros((batch, c.width))},
        reorder_cache=lambda cache, rows: {"context": cache["context"][rows]},
        position_limit=lambda c: c.max_positions,
        hidden_size=lambda c: c.width,
        special_ids=lambda c: (c.bos_token_id, c.eos_token_id, c.eos_token_id),
    )


@pytest.fixture
def plugins():
    cond.register(ItemOffset)
    families.register(_toy_family())
    yield
    del cond.METHODS[ItemOffset.method_name]
    families.unregister(TOY_TYPE)


def toy_config() -> ml_collections.ConfigDict:
    cfg = load_config(TINY)
    cfg.model.conditioning = "id_prompt+item_offset"
    cfg.model.decoder = ml_collections.ConfigDict({"model_type": TOY_TYPE, "width": 8})
    cfg.model.item_offset_scale = 0.25
    cfg.train.steps = 4
    return cfg


def test_registered_method_is_a_config_choice_with_its_hyperparameter(plugins):
    cfg = toy_config()
    validate(cfg)
    assert "id_prompt+item_offset" in cond.valid_conditionings()
    cfg.model.item_offset_scale = -1.0
    with pytest.raises(ConfigError, match=r"model.item_offset_scale=-1.0: must be > 0"):
        validate(cfg)


def test_toy_method_and_family_train_sample_and_round_trip(plugins, tmp_path):
    cfg = toy_config()
    workdir = tmp_path / "run"
    loop.train(cfg, workdir)
    run = load_run(workdir, which="latest")
    assert run.step == 4
    assert isinstance(run.model.spec.decoder, ToyConfig)
    assert set(run.params["conditioning_item_offset"]) == {"table"}

    # Sampling (prefill + cached steps) equals greedy decoding by full forward passes.
    rows = 3
    batch = {"example": np.arange(rows), "user": np.arange(1, 4), "item": np.arange(2, 5)}
    settings = sampling.SamplingConfig(max_new_tokens=4, batch_size=4)
    tokens = sampling.generate(run.model, run.params, batch, settings)
    bos = run.model.spec.decoder.bos_token_id
    ids = np.full((rows, 1), bos, np.int32)
    for _ in range(4):
        full = {**batch, "decoder_ids": ids, "decoder_mask": np.ones_like(ids)}
        logits = run.model.apply({"params": run.params}, full)
        ids = np.concatenate([ids, np.argmax(logits[:, -1], -1)[:, None].astype(np.int32)], 1)
    expected = ids[:, 1:]
    eos = run.model.spec.decoder.eos_token_id
    for row, want in zip(tokens, expected, strict=True):
        n = sampling.output_lengths(want[None], eos)[0]
        np.testing.assert_array_equal(row[:n], want[:n])

    # Hugging Face folder round trip, then a generator initialised from it.
    module = ToyBigram(run.model.spec.decoder)
    folder = hf.save_pretrained(tmp_path / "toy_hf", module, run.params["decoder"])
    loaded, params = hf.load_pretrained(folder)
    assert loaded.config == run.model.spec.decoder
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(run.params["decoder"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cfg.init.decoder = str(folder)
    model, fresh = build_generator(
        cfg, run.dataset.num_users, run.dataset.num_items, jax.random.key(7)
    )
    for a, b in zip(jax.tree.leaves(fresh["decoder"]), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
