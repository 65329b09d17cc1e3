"""Optimizer: AdamW with warmup + decay, global-norm clipping, and frozen parameter groups.

Freezing is an optax mask: parameters of frozen groups get ``optax.set_to_zero()`` updates, so
they stay bitwise unchanged, and the train step stops their gradients so none are computed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import traverse_util

from research.models.generator import GROUPS, param_group

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(
    peak: float, total_steps: int, warmup_steps: int, decay: str, end_fraction: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak``, then ``decay`` down to ``end_fraction * peak``."""
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    rest = max(total_steps - warmup_steps, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=end_fraction)
    elif decay == "linear":
        after = optax.linear_schedule(peak, peak * end_fraction, rest)
    elif decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"train.schedule={decay!r}: valid choices are {list(SCHEDULES)}")
    return optax.join_schedules([warmup, after], [warmup_steps])


def trainable_labels(params: dict[str, Any], trainable: tuple[str, ...]) -> dict[str, Any]:
    """Tree like ``params`` with leaves "train" or "frozen"."""
    unknown = set(trainable) - set(GROUPS)
    if unknown:
        raise ValueError(f"train.trainable has unknown groups {sorted(unknown)}; valid: {GROUPS}")
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {p: "train" if param_group(p) in trainable else "frozen" for p in flat}
    )


def make_optimizer(
    params: dict[str, Any],
    trainable: tuple[str, ...],
    schedule: optax.Schedule,
    *,
    weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW on the trainable groups (decay on matrices only, as in GPT-2), zero elsewhere."""
    decay_mask = jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    adamw = optax.adamw(schedule, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
    train = optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw
    return optax.multi_transform(
        {"train": train, "frozen": optax.set_to_zero()}, trainable_labels(params, trainable)
    )
