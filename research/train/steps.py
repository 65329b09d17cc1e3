"""The pmapped train and eval steps: pure functions of (state, batch).

Device layout: ``state`` is replicated over local devices; every batch array has shape
``[devices, accum_steps, per_device_batch, ...]`` for training and ``[devices, batch, ...]``
for evaluation. Losses are token-weighted: each device returns sums, ``psum`` adds them over
the device axis, and the mean is taken once, so the update does not depend on how the
global batch is split over devices or accumulation steps (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.train.loss import token_loss_sums

AXIS = "devices"
State = dict[str, Any]  # {"step": int32 [], "params": tree, "opt_state": tree}


def init_state(params: dict[str, Any], tx: optax.GradientTransformation) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def dropout_key(seed_key: jax.Array, step: jax.Array, micro_step: int | jax.Array) -> jax.Array:
    """Dropout randomness from (seed, step, device, micro-step) only: runs replay exactly.

    ``lax.axis_index`` is the global device index, so multi-host runs stay distinct per device.
    """
    key = jax.random.fold_in(seed_key, step)
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
    return jax.random.fold_in(key, micro_step)


def _stop_frozen(params, labels):
    return jax.tree_util.tree_map(
        lambda p, label: p if label == "train" else jax.lax.stop_gradient(p), params, labels
    )


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    labels: dict[str, Any],
    schedule: optax.Schedule,
    *,
    deterministic: bool = False,
    donate: bool = True,
) -> Callable:
    """pmapped ``step(state, batch, seed_key) -> (state, metrics)``.

    ``labels`` ("train"/"frozen" per parameter) are static: a stage change makes a new step.
    ``seed_key`` is the run's base key, replicated. Metrics (replicated, identical on every
    device): ``loss`` (mean per target token), ``tokens``, ``grad_norm``, ``learning_rate``.
    A step whose loss or gradient norm is not finite returns ``state`` unchanged.
    """

    def loss_sums(params, micro_batch, key):
        logits = model.apply(
            {"params": _stop_frozen(params, labels)},
            micro_batch,
            deterministic=deterministic,
            rngs={"dropout": key},
        )
        total, count = token_loss_sums(
            logits, micro_batch["decoder_ids"], micro_batch["decoder_mask"]
        )
        return total, count

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def step(state, batch, seed_key):
        accum = jax.tree_util.tree_leaves(batch)[0].shape[0]

        def micro(carry, inputs):
            grads, total, count = carry
            i, micro_batch = inputs
            (t, c), g = grad_fn(
                state["params"], micro_batch, dropout_key(seed_key, state["step"], i)
            )
            return (jax.tree_util.tree_map(jnp.add, grads, g), total + t, count + c), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state["params"])
        (grads, total, count), _ = jax.lax.scan(
            micro, (zeros, jnp.zeros(()), jnp.zeros(())), (jnp.arange(accum), batch)
        )
        count = jax.lax.psum(count, AXIS)
        norm = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: jax.lax.psum(g, AXIS) / norm, grads)
        loss = jax.lax.psum(total, AXIS) / norm
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
        }
        grad_norm = optax.tree.norm(grads)
        # Decided on the device, so the loop need not wait for the loss: a diverged step
        # leaves the state as it was (the loop stops once it fetches the metrics).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = jax.tree_util.tree_map(
            lambda new, old: jnp.where(finite, new, old), new_state, state
        )
        metrics = {
            "loss": loss,
            "tokens": count,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
        }
        return new_state, metrics

    return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,) if donate else ())


def make_eval_step(model: Any) -> Callable:
    """pmapped ``eval_step(params, batch) -> (loss_sum, token_count)``, summed over devices."""

    def step(params, batch):
        logits = model.apply({"params": params}, batch, deterministic=True)
        total, count = token_loss_sums(logits, batch["decoder_ids"], batch["decoder_mask"])
        return jax.lax.psum(total, AXIS), jax.lax.psum(count, AXIS)

    return jax.pmap(step, axis_name=AXIS)


def _mesh_sharding(devices: int) -> NamedSharding:
    local = jax.local_devices()[:devices]
    return NamedSharding(Mesh(np.array(local), (AXIS,)), PartitionSpec(AXIS))


def to_devices(batch: dict[str, Any], devices: int) -> dict[str, Any]:
    """A sharded host batch (``[devices, ...]``, see :func:`shard`) copied onto the devices.

    The copy starts at once and does not wait for the device; laid out like :func:`replicate`.
    """
    sharding = _mesh_sharding(devices)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch)


def replicate(tree: Any, devices: int) -> Any:
    """A copy of every leaf on each of the first ``devices`` local devices: ``[devices, ...]``.

    The copies are laid out as the pmapped steps lay out their outputs (one mesh axis named
    ``AXIS``), so a step called first on replicated state and then on its own output compiles
    once. ``flax.jax_utils.replicate`` names that axis differently, and the second call compiled
    the whole train step again.
    """
    local = jax.local_devices()[:devices]
    sharding = _mesh_sharding(devices)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                put(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        one = jnp.asarray(x)[None]
        copies = [jax.device_put(one, device) for device in local]
        return jax.make_array_from_single_device_arrays((devices, *one.shape[1:]), sharding, copies)

    return jax.tree_util.tree_map(put, tree)


def shard(batch: dict[str, Any], devices: int, accum_steps: int | None = None) -> dict[str, Any]:
    """``[global_batch, ...]`` host arrays -> ``[devices, (accum,) per_device, ...]``."""

    def split(x):
        lead = (devices, accum_steps) if accum_steps else (devices,)
        per = x.shape[0] // (devices * (accum_steps or 1))
        if per * devices * (accum_steps or 1) != x.shape[0]:
            raise ValueError(
                f"batch of {x.shape[0]} rows does not split into {devices} devices"
                + (f" x {accum_steps} accumulation steps" if accum_steps else "")
            )
        return x.reshape(*lead, per, *x.shape[1:])

    return jax.tree_util.tree_map(split, batch)
