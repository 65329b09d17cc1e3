"""Research throughput: a frozen encoder read from its feature cache, the loop's own cost, and
compiling with JAX's persistent cache filled.

* ``train_frozen_encoder``: the model of ``experiments/configs/ablation_amazon_mi.py`` (4-layer,
  256-wide GPT-2; MiniLM frozen over 256 history tokens; batch 64) conditioned by ``prefix`` or
  ``cross_attention``. Ours reads the encoder's features as the feature cache stores them
  (``research/train/feature_cache.py``; gathered into the batch and copied to the device at
  every step); the reference is PEPLER-style PyTorch that runs the same frozen encoder under
  ``torch.no_grad()`` at every step, then trains decoder and conditioning with AdamW.
* ``loop_overhead``: steps/s of the whole ``research.train.loop.train`` (data, logging,
  checkpoint decisions; evaluation and saving fall outside the timed window) divided by steps/s
  of the same compiled step called bare on batches already on the devices. Small model.
* ``compile`` (warm cache): the first train-step result in a fresh process whose persistent
  compilation cache an identical process filled just before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from research.bench.common import NO_DROPOUT, Setup, interleaved, median, minilm_config
from research.models.bert import BertConfig
from research.models.generator import Generator, GeneratorSpec
from research.models.gpt2 import GPT2Config
from research.train.feature_cache import FeatureCache, encode_function
from research.train.optim import make_optimizer, trainable_labels
from research.train.steps import (
    make_train_step,
    replicate,
    replicated_init_state,
    shard,
    to_devices,
)

FROZEN = ("decoder", "conditioning")
METHODS = ("prefix", "cross_attention")
PREFIX_LENGTH = 4  # the config default


@dataclasses.dataclass(frozen=True)
class FrozenShapes:
    decoder: GPT2Config
    encoder: BertConfig
    batch: int
    seq: int  # decoder tokens: a 20-token first sentence with BOS and EOS
    encoder_seq: int


def frozen_shapes(setup: Setup) -> FrozenShapes:
    """The ablation config's model and batch (smoke: the setup's tiny networks)."""
    if setup.name == "smoke":
        return FrozenShapes(setup.decoder, setup.encoder, 4, setup.seq, setup.encoder_seq)
    decoder = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=64, **NO_DROPOUT)
    return FrozenShapes(decoder, minilm_config(), 64, 22, 256)


def _random_batch(shapes: FrozenShapes, rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(0, shapes.decoder.vocab_size, (shapes.batch, shapes.seq), dtype=np.int32)
    enc = rng.integers(
        0, shapes.encoder.vocab_size, (shapes.batch, shapes.encoder_seq), dtype=np.int32
    )
    return {
        "decoder_ids": ids,
        "decoder_mask": np.ones_like(ids),
        "encoder_ids": enc,
        "encoder_mask": np.ones_like(enc),
        "example": np.arange(shapes.batch, dtype=np.int32),
    }


class CachedFeatureStep:
    """Our frozen-encoder step: features gathered from the cache, then the train step."""

    def __init__(self, model: Generator, params, batch: dict[str, np.ndarray], kind: str):
        features = np.asarray(
            encode_function(model, kind)(params, batch["encoder_ids"], batch["encoder_mask"])
        )
        rows = len(batch["example"])
        if kind == "states":
            features = features.reshape(-1, features.shape[-1])  # every row is full length
        offsets = np.arange(rows + 1, dtype=np.int64) * batch["encoder_mask"].shape[1]
        self.cache = FeatureCache(Path("."), kind, {"train": features}, {"train": offsets})
        schedule = optax.constant_schedule(1e-4)
        tx = make_optimizer(params, FROZEN, schedule)
        labels = trainable_labels(params, FROZEN)
        self.step = make_train_step(model.clone(frozen_encoder=True), tx, labels, schedule)
        self.state = replicated_init_state(params, tx, 1)
        self.key = replicate(jax.random.key(0), 1)
        self.batch = batch

    def __call__(self) -> float:
        batch = self.cache.attach(self.batch, "train")
        batch.pop("example")
        self.state, metrics = self.step(self.state, shard(batch, 1, 1), self.key)
        return float(metrics["loss"][0])


class TorchFrozenEncoderStep:
    """PEPLER-style PyTorch: BertModel under ``torch.no_grad()`` every step, then GPT-2 with a
    soft prefix from the mean-pooled states (``prefix``) or cross-attention over the states
    projected to the decoder's width (``cross_attention``, as ``EncoderDecoderModel``)."""

    def __init__(self, shapes: FrozenShapes, method: str, batch: dict[str, np.ndarray]):
        import torch
        import transformers

        torch.manual_seed(0)
        encoder_config = transformers.BertConfig(**dataclasses.asdict(shapes.encoder))
        self.encoder = transformers.BertModel(encoder_config).eval()
        self.encoder.requires_grad_(False)
        d, e = shapes.decoder.n_embd, shapes.encoder.hidden_size
        cross = method == "cross_attention"
        decoder_config = transformers.GPT2Config(
            **dataclasses.asdict(shapes.decoder), add_cross_attention=cross
        )
        self.decoder = transformers.GPT2LMHeadModel(decoder_config).train()
        if cross:
            self.conditioning = torch.nn.Linear(e, d)
        else:
            self.conditioning = torch.nn.Sequential(
                torch.nn.Linear(e, d), torch.nn.Tanh(), torch.nn.Linear(d, PREFIX_LENGTH * d)
            )
        self.method, self.torch = method, torch
        trained = [*self.decoder.parameters(), *self.conditioning.parameters()]
        self.trained = trained
        self.optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.01)
        tensor = lambda key: torch.as_tensor(batch[key], dtype=torch.long)  # noqa: E731
        self.enc_ids, self.enc_mask = tensor("encoder_ids"), tensor("encoder_mask")
        self.ids, self.mask = tensor("decoder_ids"), tensor("decoder_mask")

    def __call__(self) -> float:
        torch = self.torch
        with torch.no_grad():
            states = self.encoder(input_ids=self.enc_ids, attention_mask=self.enc_mask)
            states = states.last_hidden_state
        if self.method == "cross_attention":
            logits = self.decoder(
                input_ids=self.ids,
                attention_mask=self.mask,
                encoder_hidden_states=self.conditioning(states),
                encoder_attention_mask=self.enc_mask,
            ).logits
        else:
            weights = self.enc_mask[..., None].float()
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            prefix = self.conditioning(pooled).view(len(pooled), PREFIX_LENGTH, -1)
            embeds = torch.cat([prefix, self.decoder.transformer.wte(self.ids)], dim=1)
            mask = torch.cat([torch.ones_like(self.mask[:, :PREFIX_LENGTH]), self.mask], dim=1)
            logits = self.decoder(inputs_embeds=embeds, attention_mask=mask).logits
            logits = logits[:, PREFIX_LENGTH:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), self.ids[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def measure_train_frozen_encoder(run) -> list[dict[str, Any]]:
    from research.bench import ours
    from research.bench.measure import _speed_row

    s = run.setup
    shapes = frozen_shapes(s)
    rows = []
    for method in METHODS:
        batch = _random_batch(shapes, np.random.default_rng(0))
        model = Generator(GeneratorSpec(shapes.decoder, shapes.encoder, (method,)), s.jnp_dtype)
        kind = "states" if method == "cross_attention" else "pooled"
        steps = {"ours": CachedFeatureStep(model, ours.random_params(model), batch, kind)}
        if run.reference_device == "cpu":
            steps["reference"] = TorchFrozenEncoderStep(shapes, method, batch)
        first_loss = {side: step() for side, step in steps.items()}
        times = interleaved(steps, max(s.warmup - 1, 0), s.repeats)
        rows.append(
            _speed_row(
                "train_frozen_encoder",
                f"{method}, {shapes.batch} x ({shapes.encoder_seq} encoder + {shapes.seq}) tokens",
                shapes.batch * shapes.seq,
                times,
                {
                    "batch": shapes.batch,
                    "seq": shapes.seq,
                    "encoder_seq": shapes.encoder_seq,
                    "decoder": f"{shapes.decoder.n_layer} x {shapes.decoder.n_embd}",
                },
                first_loss=first_loss,
                note="ours reads cached encoder features; the reference encodes every step",
            )
        )
    return rows


def _loop_config(setup: Setup, steps: int):
    from research.config import load_config

    small = setup.name == "smoke"
    overrides = {
        "model.conditioning": "none",
        "model.decoder.n_layer": "1" if small else "2",
        "model.decoder.n_embd": "64" if small else "128",
        "data.synthetic.num_reviews": "400",
        "train.steps": str(steps),
        "train.batch_size": "8" if small else "32",
        "train.log_every": "5",
        "train.eval_every": str(10 * steps),
        "train.max_eval_batches": "1",
        "train.checkpoint_every": str(10 * steps),
        "train.tensorboard": "false",
        "cache.compilation_dir": "off",  # every trial compiles, outside the timed window
    }
    return load_config(None, overrides.items())


@contextlib.contextmanager
def _timed_log_rows(times: dict[int, float]):
    """While active, the training loop's metric rows record when they were written."""
    from research.train import loop

    original = loop.MetricsLog

    class Timed(original):
        def write(self, step, split, values):
            if split == "train":
                times[step] = time.perf_counter()
            super().write(step, split, values)

    loop.MetricsLog = Timed
    try:
        yield
    finally:
        loop.MetricsLog = original


def measure_loop_overhead(run) -> list[dict[str, Any]]:
    from research.data.pipeline import load_dataset
    from research.train import loop
    from research.train.trainer import Trainer

    s = run.setup
    steps, first = (20, 5) if s.name == "smoke" else (60, 10)
    timed = steps - first
    results: dict[str, list[float]] = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = _loop_config(s, steps)
        dataset = load_dataset(cfg.data)
        trainer = Trainer(cfg, root, dataset)
        tx = trainer.optimizer(2)
        step_fn = trainer.train_step(2, tx)
        iterator = dataset.train_iterator(cfg.train.batch_size, cfg.seed)
        devices = trainer.devices
        batches = [
            to_devices(shard(trainer.host_batch(next(iterator), "train"), devices, 1), devices)
            for _ in range(timed)
        ]
        key = replicate(trainer.dropout_seed, devices)

        def bare() -> float:
            state = replicated_init_state(trainer.initial_params, tx, devices)
            state, _ = step_fn(state, batches[0], key)  # compiled already after the first
            jax.block_until_ready(state)
            start = time.perf_counter()
            for batch in batches:
                state, _ = step_fn(state, batch, key)
            jax.block_until_ready(state)
            return time.perf_counter() - start

        for trial in range(3 if s.name != "smoke" else 1):
            rows: dict[int, float] = {}
            with _timed_log_rows(rows):
                loop.train(cfg, root / f"run{trial}")
            results["ours"].append(rows[steps] - rows[first])
            results["reference"].append(bare())
    loop_rate = timed / median(results["ours"])
    bare_rate = timed / median(results["reference"])
    return [
        {
            "measurement": "loop_overhead",
            "case": f"train() vs its bare step, {cfg.train.batch_size} x GPT-2 "
            f"{cfg.model.decoder.n_layer}x{cfg.model.decoder.n_embd}",
            "unit": "steps/s",
            "better": "higher",
            "ours": loop_rate,
            "reference": bare_rate,
            "ratio": loop_rate / bare_rate,
            "shapes": {"batch": cfg.train.batch_size, "timed_steps": timed},
            "seconds": results,
            "note": "reference column: the same compiled step called bare (not PyTorch)",
        }
    ]


@contextlib.contextmanager
def _environment(**values: str):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def measure_warm_compile(run) -> list[dict[str, Any]]:
    """Two identical fresh processes share a new persistent cache; the second's first step
    (next to PyTorch's first call, which compiles nothing)."""
    from research.bench.run_state import run_children

    theirs = run.child("reference", "train") if run.reference_device is not None else None
    ref_s = theirs["first_result_s"] if theirs else None
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            "JAX_COMPILATION_CACHE_DIR": tmp,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }
        with _environment(**env):
            cold = run_children([("ours", ("train",))], {"ours": run.setup.name})["ours", "train"]
            warm = run_children([("ours", ("train",))], {"ours": run.setup.name})["ours", "train"]
    return [
        {
            "measurement": "compile",
            "case": "train step, warm persistent cache",
            "unit": "s",
            "better": "lower",
            "ours": warm["first_result_s"],
            "reference": ref_s,
            "ratio": warm["first_result_s"] / ref_s if ref_s else None,
            "shapes": warm["shapes"],
            "ours_cold_cache_s": cold["first_result_s"],
            "ours_next_call_s": warm["next_call_s"],
            "note": "fresh process; an identical process filled the cache just before",
        }
    ]
