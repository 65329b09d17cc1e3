"""Our side of each measurement: the project's real train step and sampler, on one device.

Imports no torch, so an ``ours`` child process measures JAX's memory alone."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import sampling
from research.bench.common import Setup
from research.models import families, hf
from research.models.generator import (
    GROUPS,
    Generator,
    GeneratorSpec,
    init_generator,
    param_group,
)
from research.train.optim import make_optimizer, trainable_labels
from research.train.steps import (
    compile_ahead,
    make_train_step,
    replicate,
    replicated_init_state,
    shard,
)


def lm_model(setup: Setup, decoding: bool = False) -> Generator:
    """Plain GPT-2 (no encoder, no conditioning). Decoding uses XLA's attention: cuDNN's fused
    kernel is for long queries, a decoding step has one."""
    impl = None if decoding else setup.attention_impl
    return Generator(GeneratorSpec(setup.decoder, None), setup.jnp_dtype, impl)


def conditioned_model(setup: Setup) -> Generator:
    """The encoder (BERT/MiniLM) conditioning GPT-2 through cross-attention in every block."""
    spec = GeneratorSpec(
        setup.decoder, setup.encoder, ("cross_attention",), {"cross_attention_every": 1}
    )
    return Generator(spec, setup.jnp_dtype, setup.attention_impl)


def random_params(model: Generator, seed: int = 0, base_dtype: Any = None) -> dict[str, Any]:
    """GPT-2-style random weights: matrices ~ N(0, 0.02), LayerNorm scales 1, biases 0.

    Drawn by numpy into the shapes ``init_generator`` gives: compiling the initialisers
    would take longer than the measurement they serve. ``base_dtype``: the decoder/encoder
    weights (not LoRA adapters) in that dtype, each cast as it is drawn (a frozen base).
    """
    shapes = jax.eval_shape(lambda key: init_generator(model, key), jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", "")
        keys = tuple(getattr(k, "key", k) for k in path)
        dtype = leaf.dtype
        if base_dtype is not None and param_group(keys) in ("decoder", "encoder"):
            dtype = base_dtype
        if name == "scale":
            return np.ones(leaf.shape, dtype)
        if name in ("bias", "lora_b"):  # B = 0: step 0 is the base model
            return np.zeros(leaf.shape, dtype)
        return (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def params_from_reference(torch_model: Any, setup: Setup) -> dict[str, Any]:
    """The reference decoder's weights (a transformers model, read through its
    ``state_dict``: this module never imports torch) as our generator's parameters
    (``{"decoder": ...}``), so both sides run the very same network (and greedy decoding can
    be compared token by token)."""
    config = setup.decoder
    family = families.decoder_family(config)
    tensors = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    expected = hf.abstract_params(family.module_cls(config), config)
    tree = hf.convert_to_flax(family.hf, config, tensors, expected, "reference")
    return {"decoder": jax.tree.map(jnp.asarray, tree)}


def device_peak_bytes() -> int | None:
    """The first device's peak allocation so far, where its backend reports one."""
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


class TrainStep:
    """``research.train.steps.make_train_step`` (loss, gradients, clipped AdamW) on one device.

    The ``trainable`` groups train (default: all), the learning rate is constant; ``__call__`` runs one step on the same
    batch and returns the loss as a Python float (which waits for the step to finish). The
    first call compiles the step ahead of running it, as the training loop does
    (``research.train.steps.compile_ahead``).
    """

    def __init__(
        self,
        model: Generator,
        params: dict[str, Any],
        batch: dict[str, np.ndarray],
        trainable: tuple[str, ...] = GROUPS,
    ):
        schedule = optax.constant_schedule(1e-4)
        tx = make_optimizer(params, trainable, schedule)
        self.step = make_train_step(model, tx, trainable_labels(params, trainable), schedule)
        # Laid out as the training loop lays them out: [devices, ...] state and key, batches
        # [devices, accum, rows, ...] (the batch goes in as host arrays, as the loop's do).
        self.state = replicated_init_state(params, tx, 1)
        self.key = replicate(jax.random.key(0), 1)
        self.batch = shard(batch, 1, 1)
        self.compiled = False

    def __call__(self) -> float:
        if not self.compiled:
            compile_ahead(self.step, self.state, self.batch, self.key)
            self.compiled = True
        self.state, metrics = self.step(self.state, self.batch, self.key)
        return float(metrics["loss"][0])


def decoding_weights(model: Generator, params: dict[str, Any], weights_dtype: str):
    """``params`` on the first device, prepared for decoding in ``weights_dtype`` (once per
    loaded model, as the reference's weights are loaded once) -> (weights, seconds taken)."""
    start = time.perf_counter()
    params = jax.device_put(params, jax.devices()[0])
    weights = sampling.decoding_weights(model, params, {"weights_dtype": weights_dtype})
    jax.block_until_ready(weights)
    return weights, time.perf_counter() - start


def greedy(
    model: Generator,
    weights: sampling.DecodeWeights,
    prompt_ids: np.ndarray,
    new_tokens: int,
):
    """A function decoding ``prompt_ids`` ``[rows, prompt]`` greedily with
    ``research.sampling.generate`` from ``weights`` (:func:`decoding_weights`) -> exactly
    ``new_tokens`` tokens per row (EOS is forbidden until then, as ``min_new_tokens`` does in
    Hugging Face's ``generate``)."""
    rows = prompt_ids.shape[0]
    cfg = sampling.SamplingConfig(
        strategy="greedy",
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        batch_size=rows,
        weights_dtype=weights.dtype,
    )
    batch = {
        "example": np.arange(rows),
        "prompt_ids": prompt_ids,
        "prompt_mask": np.ones_like(prompt_ids),
    }
    return lambda: sampling.generate(model, weights, batch, cfg, devices=jax.devices()[:1])
