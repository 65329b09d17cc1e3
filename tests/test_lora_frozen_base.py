"""A frozen LoRA base: kept in bfloat16 on request, with no optimizer state or gradients.

References: the float32 run of the same model and data (the loss curve), the trainable
leaves (the only shapes the optimizer state and the gradient accumulator may hold).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from research import config as config_lib
from research.models.generator import Generator, init_generator, param_group
from research.train import frozen_init
from research.train.optim import learning_rate_schedule, make_optimizer, trainable_labels
from research.train.steps import init_state, make_train_step, replicate, shard

from .test_lora import _batch, _spec

TRAINABLE = ("lora", "conditioning")


def _cfg(frozen_dtype: str):
    cfg = config_lib.default_config()
    cfg.model.lora.rank = 4
    cfg.train.trainable = TRAINABLE
    cfg.train.frozen_dtype = frozen_dtype
    config_lib.validate(cfg)
    return cfg


def _setup(frozen_dtype: str, with_encoder: bool = True):
    spec = _spec("gpt2", with_encoder)
    params = frozen_init.cast_base(
        _cfg(frozen_dtype), init_generator(Generator(spec), jax.random.key(0))
    )
    schedule = learning_rate_schedule(0.02, 100, 0, "constant")
    tx = make_optimizer(params, TRAINABLE, schedule, clip_norm=1.0)
    labels = trainable_labels(params, TRAINABLE)
    step = make_train_step(Generator(spec), tx, labels, schedule, deterministic=True, donate=False)
    return params, tx, step


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _sub_jaxprs(item)


def _scan_carries(jaxpr) -> list[list]:
    """The carry avals of every ``scan`` in ``jaxpr`` and the jaxprs inside it."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append([v.aval for v in eqn.outvars[: eqn.params["num_carry"]]])
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found += _scan_carries(sub)
    return found


def test_frozen_base_is_bfloat16_and_has_no_optimizer_state_or_gradients():
    params, tx, step = _setup("bfloat16")
    flat = traverse_util.flatten_dict(params)
    trainable = {p: v for p, v in flat.items() if param_group(p) in TRAINABLE}
    for path, value in flat.items():
        want = jnp.float32 if path in trainable else jnp.bfloat16
        assert value.dtype == want, path
    assert {param_group(p) for p in flat if p not in trainable} == {"decoder", "encoder"}

    # Optimizer state: AdamW's two moments of each trainable leaf, float32, nothing else.
    opt_state = tx.init(params)
    moments = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    want = sorted([(v.shape, "float32") for v in trainable.values()] * 2)
    assert sorted((x.shape, str(x.dtype)) for x in moments) == want

    # Gradients: the accumulator the train step carries holds the trainable leaves only
    # (plus the scalar loss sums), never a frozen parameter's shape.
    state = replicate(init_state(params, tx), 1)
    batch = shard(_batch(), 1, accum_steps=1)
    jaxpr = jax.make_jaxpr(step)(state, batch, replicate(jax.random.key(0), 1)).jaxpr
    (carry,) = _scan_carries(jaxpr)
    assert sorted((a.shape, str(a.dtype)) for a in carry if a.shape) == sorted(
        (v.shape, "float32") for v in trainable.values()
    )


def _losses(frozen_dtype: str, steps: int = 8) -> tuple[list[float], dict]:
    params, tx, step = _setup(frozen_dtype, with_encoder=False)
    state = replicate(init_state(params, tx), 1)
    seed = replicate(jax.random.key(3), 1)
    losses = []
    for i in range(steps):
        state, metrics = step(state, shard(_batch(seed=i % 2), 1, accum_steps=1), seed)
        losses.append(float(metrics["loss"][0]))
    return losses, jax.tree.map(lambda x: np.asarray(x[0]), state["params"])


def test_bfloat16_base_trains_and_tracks_the_float32_run():
    full, _ = _losses("float32")
    half, params = _losses("bfloat16")
    # It trains: the loss falls well below where it started (two batches, seen four times).
    assert half[-1] < half[0] - 0.1 and full[-1] < full[0] - 0.1
    # Tolerance: rounding a weight to bfloat16 changes it by at most 2^-9 (0.2%) of itself;
    # the logits of this 2-layer model move by about that fraction, and so does the loss
    # (about 6.9 here). 1% relative leaves room for the eight steps' drift; a wrong cast
    # (the base not used, or adapters in bfloat16) moves it by far more.
    np.testing.assert_allclose(half, full, rtol=1e-2)
    # ...but the base really was rounded: the curves are not identical.
    assert max(abs(a - b) for a, b in zip(half, full, strict=True)) > 0
    base = params["decoder"]["h_0"]["attn"]["c_attn"]
    assert base["kernel"].dtype == jnp.bfloat16 and base["lora_b"].dtype == jnp.float32
