"""The pmapped train and eval steps: pure functions of (state, batch).

Device layout: ``state`` is replicated over local devices; every batch array has shape
``[devices, accum_steps, per_device_batch, ...]`` for training and ``[devices, batch, ...]``
for evaluation. The text loss is a mean per target token and the rating loss a mean per rated
example of the GLOBAL batch: both counts are taken from the masks (``psum`` over devices) before
any forward pass, each micro-batch's objective divides its sums by them, and the gradients add
up, so the update does not depend on how the global batch is split over devices or
accumulation steps (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research import allocator
from research.train.loss import rating_loss_sums, target_weights, token_loss_sums

AXIS = "devices"
State = dict[str, Any]  # {"step": int32 [], "params": tree, "opt_state": tree}


def init_state(params: dict[str, Any], tx: optax.GradientTransformation) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def replicated_init_state(
    params: dict[str, Any], tx: optax.GradientTransformation, devices: int
) -> State:
    """:func:`init_state` of ``params`` laid out as :func:`replicate` lays it out.

    One jitted function builds it on the devices: no unreplicated state (the optimizer's zero
    moments) exists beside the replicated one, as ``replicate(init_state(...))`` makes. The
    state holds its own copy of ``params``; the caller's may be freed.
    """
    sharding = _mesh_sharding(devices)
    whole = NamedSharding(sharding.mesh, PartitionSpec())  # every device reads all of params

    def replicated_state(params):
        state = init_state(params, tx)
        return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (devices, *x.shape)), state)

    return jax.jit(replicated_state, in_shardings=whole, out_shardings=sharding)(params)


def dropout_key(seed_key: jax.Array, step: jax.Array, micro_step: int | jax.Array) -> jax.Array:
    """Dropout randomness from (seed, step, device, micro-step) only: runs replay exactly.

    ``lax.axis_index`` is the global device index, so multi-host runs stay distinct per device.
    """
    key = jax.random.fold_in(seed_key, step)
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
    return jax.random.fold_in(key, micro_step)


def _device_sum(tree: Any) -> Any:
    """``lax.psum`` of ``tree`` over the devices; on one device the tree itself. XLA:CPU runs
    an all-reduce over one device as a copy of its operands (the gradients: 500 MB per step)."""
    return tree if jax.lax.axis_size(AXIS) == 1 else jax.lax.psum(tree, AXIS)


def split_trainable(params, labels) -> tuple[dict, dict]:
    """``(trainable, frozen)``: the leaves of ``params`` by label, as flat ``{path: leaf}``."""
    flat, flat_labels = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels)
    trainable = {p: v for p, v in flat.items() if flat_labels[p] == "train"}
    return trainable, {p: v for p, v in flat.items() if flat_labels[p] != "train"}


def _joined(trainable: dict, frozen: dict) -> dict:
    return traverse_util.unflatten_dict({**trainable, **frozen})


def _predicts_rating(model: Any) -> bool:
    """Whether ``model`` has a rating head: a generator's spec says; a plain LM has none."""
    spec = getattr(model, "spec", None)
    return spec is not None and spec.rating.predicts


def _logits_and_rating(model: Any, variables: dict, batch: dict, rates: bool, **kwargs):
    """``(logits, rating or None)``; models without a rating head are applied plainly."""
    if rates:
        return model.apply(variables, batch, method="logits_and_rating", **kwargs)
    return model.apply(variables, batch, **kwargs), None


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    labels: dict[str, Any],
    schedule: optax.Schedule,
    *,
    text_weight: float = 1.0,
    rating_weight: float = 0.0,
    deterministic: bool = False,
    donate: bool = True,
) -> Callable:
    """pmapped ``step(state, batch, seed_key) -> (state, metrics)``.

    ``labels`` ("train"/"frozen" per parameter) are static: a stage change makes a new step.
    ``seed_key`` is the run's base key, replicated. The objective is ``text_weight`` x the mean
    per-token loss + ``rating_weight`` x the mean squared rating error (when the model has a
    rating head). Metrics (replicated, identical on every device): ``loss`` (mean per target
    token), ``tokens``, ``grad_norm``, ``learning_rate``, and with a rating head
    ``rating_mse`` and ``rated`` (examples with a rating). A step whose loss or gradient norm
    is not finite returns ``state`` unchanged.
    """
    rates = _predicts_rating(model)

    def objective(trainable, frozen, micro_batch, key, tokens, rated):
        logits, rating = _logits_and_rating(
            model,
            {"params": _joined(trainable, frozen)},
            micro_batch,
            rates,
            deterministic=deterministic,
            rngs={"dropout": key},
        )
        sums = {
            "text": token_loss_sums(
                logits, micro_batch["decoder_ids"], micro_batch["decoder_mask"]
            )[0]
        }
        value = text_weight * sums["text"] / tokens
        if rates:
            sums["rating"] = rating_loss_sums(
                rating, micro_batch["rating"], micro_batch["rating_mask"]
            )[0]
            value = value + rating_weight * sums["rating"] / rated
        return value, sums

    grad_fn = jax.grad(objective, has_aux=True)  # of the trainable leaves only

    def step(state, batch, seed_key):
        accum = jax.tree_util.tree_leaves(batch)[0].shape[0]
        # Global counts first: every micro-batch's objective is then already a share of the mean.
        tokens = jnp.maximum(_device_sum(target_weights(batch["decoder_mask"]).sum()), 1.0)
        rated = jnp.ones(())
        if rates:
            rated = jnp.maximum(_device_sum(batch["rating_mask"].sum(dtype=jnp.float32)), 1.0)

        trainable, frozen = split_trainable(state["params"], labels)

        def micro(carry, inputs):
            grads, sums = carry
            i, micro_batch = inputs
            key = dropout_key(seed_key, state["step"], i)
            g, s = grad_fn(trainable, frozen, micro_batch, key, tokens, rated)
            return jax.tree_util.tree_map(jnp.add, (grads, sums), (g, s)), None

        # Gradients exist for the trainable leaves only.
        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        no_sums = {"text": jnp.zeros(())} | ({"rating": jnp.zeros(())} if rates else {})
        (grads, sums), _ = jax.lax.scan(micro, (zeros, no_sums), (jnp.arange(accum), batch))
        grads = _device_sum(grads)
        loss = _device_sum(sums["text"]) / tokens
        grad_norm = optax.tree.norm(grads)
        # Decided on the device, so the loop need not wait for the loss: a diverged step
        # leaves the state as it was (the loop stops once it fetches the metrics). A cond, not
        # a select of new against old: only the taken branch's state exists, so the step does
        # not hold two copies of parameters and moments (nor rewrite a frozen base).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def updated(state):
            trainable, frozen = split_trainable(state["params"], labels)
            # The optimizer's frozen branch (set_to_zero, no state) reads only the structure
            # of its leaves' gradients: a 0-d zero stands in for each, and its "update" is not
            # applied.
            placeholders = {p: jnp.zeros((), v.dtype) for p, v in frozen.items()}
            updates, opt_state = tx.update(
                _joined(grads, placeholders), state["opt_state"], state["params"]
            )
            updates, _ = split_trainable(updates, labels)
            return {
                "step": state["step"] + 1,
                "params": _joined(optax.apply_updates(trainable, updates), frozen),
                "opt_state": opt_state,
            }

        new_state = jax.lax.cond(finite, updated, lambda state: state, state)
        metrics = {
            "loss": loss,
            "tokens": tokens,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
        }
        if rates:
            metrics["rating_mse"] = _device_sum(sums["rating"]) / rated
            metrics["rated"] = rated
        return new_state, metrics

    return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,) if donate else ())


def compile_ahead(step: Callable, *args: Any) -> None:
    """Compile the pmapped ``step`` for ``args`` before its first call, then hand the memory
    compiling it freed back to the OS (:func:`research.allocator.trim_heap`).

    ``step(*args)`` then finds the executable in the cache of its usual call path (pmap's
    ``lower`` traces and compiles the same jitted function) and compiles nothing: donation and
    shardings are the call's own, and ``args`` are only read for their shapes and layout
    (nothing is donated here). Compiling inside the first call instead left the freed memory in
    the process under the step's temporaries (experiments/bench/README.md, memory).
    """
    step.lower(*args).compile()
    allocator.trim_heap()


def release_compiled_steps() -> None:
    """Free every compiled step of this process (``jax.clear_caches``); call once a run's
    steps are done with.

    JAX 0.10's ``pmap`` is a ``shard_map`` whose cache keeps each function it was given, and
    with it the compiled executable, for the life of the process. Every executable maps its
    kernels' code, so the runs of one process (ablation cells, notebook reruns, tests) add up
    until ``mmap`` fails at the kernel's ``vm.max_map_count`` and LLVM aborts the process.
    """
    jax.clear_caches()


def make_eval_step(model: Any) -> Callable:
    """pmapped ``eval_step(params, batch) -> sums``, each summed over devices.

    ``sums``: ``loss_sum`` and ``tokens`` (the text loss), and with a rating head
    ``rating_sq_error`` and ``rated``.
    """
    rates = _predicts_rating(model)

    def step(params, batch):
        logits, rating = _logits_and_rating(
            model, {"params": params}, batch, rates, deterministic=True
        )
        total, count = token_loss_sums(logits, batch["decoder_ids"], batch["decoder_mask"])
        sums = {"loss_sum": total, "tokens": count}
        if rates:
            sums["rating_sq_error"], sums["rated"] = rating_loss_sums(
                rating, batch["rating"], batch["rating_mask"]
            )
        return _device_sum(sums)

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
