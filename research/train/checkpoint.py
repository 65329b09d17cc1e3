"""Checkpoints: Orbax ``CheckpointManager`` in ``WORKDIR/checkpoints``, safe to kill at any moment.

A checkpoint is one step directory holding two items, written by Orbax:

* ``state``: a pytree of arrays (params, optimizer state, ``jax.random.key_data`` of the RNG key,
  step counter, ...), stored with ``StandardSave`` as numpy arrays.
* ``meta``: a JSON dict (data iterator position, training stage, config hash, ...).

plus Orbax's ``metrics`` item (``{"val_loss": x}``) when the save was given a validation loss.

Retention is "the last ``keep_last`` steps plus the best one by validation loss". That is *not*
what Orbax's legacy options do: ``max_to_keep=K`` together with ``best_fn`` keeps the K *best*
steps (the newest step can be deleted right after it was written if its loss is worse), and
``keep_checkpoints_without_metrics=True`` keeps every step saved without a loss forever. So we pass
an explicit ``preservation_policy``: ``LatestN(keep_last)`` OR ``BestN(n=1)``, where ``BestN``
ranks only steps that have a loss (``keep_checkpoints_without_metrics=False``: a step without a
loss is neither "worse" than the best nor kept forever; it lives as long as it is among the last
``keep_last``).

Kill safety (local or network POSIX file systems):

* Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` once
  complete; only renamed directories count as steps, so a save killed midway is invisible.
  ``cleanup_tmp_directories=True`` removes such leftovers when the next ``Checkpointer`` starts.
  (A SIGKILL loses nothing written; surviving a power cut would also need fsyncs, not done here.)
* Orbax deletes old steps with ``rmtree`` in place, and a kill in the middle would leave a
  half-deleted directory that still looks like a complete step. ``todelete_subdir`` makes Orbax
  *rename* old steps into ``checkpoints/deleted/`` instead (atomic); we empty that folder after
  each save and on start.

Use from the train loop: call ``save`` at *every* step and let it decide (``save_every``, and
JAX's multi-host preemption notice, which needs every process to ask at every step); pass
``force=True`` at the end of the run and on SIGTERM. Leaves are copied to host memory only when a
save happens; for pmapped state pass one replica (``jax.tree.map(lambda x: x[0], state)``).
``restore`` returns numpy arrays, to be replicated onto the devices again.

Multi-process (``jax.distributed.initialize`` called first): every process constructs the
``Checkpointer`` on the same shared directory and calls ``save``/``restore`` at the same steps
with the same arguments (Orbax places barriers inside). The state is replicated (pmap), so only
process 0 writes arrays, ``meta`` and metrics, and deletes old steps (Orbax's ``primary_host=0``);
the other processes' values are not written, so ``meta`` must describe the *global* position
(e.g. the global batch index) from which each process derives its own shard. Every process reads
the whole checkpoint on restore. Globally sharded (non-replicated) arrays are not supported: they
would need ``StandardSave`` on sharded ``jax.Array`` s instead of host numpy copies.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

VAL_LOSS = "val_loss"
STATE_ITEM = "state"
META_ITEM = "meta"
# Old steps are renamed here (atomic) and then removed; Orbax ignores it: not a step name.
DELETED_SUBDIR = "deleted"


def _val_loss(metrics: dict[str, float]) -> float:
    return metrics[VAL_LOSS]


def _host_array(path: tuple, leaf: Any) -> np.ndarray:
    """``leaf`` as a numpy array (may be a view: Orbax copies host arrays before writing them)."""
    name = jax.tree_util.keystr(path)
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        raise TypeError(f"state{name} is a typed PRNG key; store jax.random.key_data(key) instead")
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise ValueError(
            f"state{name} spans several processes; pass this process's replica of it "
            "(e.g. x.addressable_data(0)); sharded state is not supported"
        )
    if not isinstance(leaf, np.ndarray | np.generic | jax.Array):
        raise TypeError(f"state{name} is a {type(leaf).__name__}; state leaves must be arrays")
    if np.size(leaf) == 0:
        # Orbax refuses these mid-save, which leaves its background threads waiting minutes.
        raise ValueError(f"state{name} has no elements; Orbax cannot save empty arrays")
    return np.asarray(leaf)


def _abstract_leaf(path: tuple, leaf: Any) -> jax.ShapeDtypeStruct:
    """Shape and dtype of a target leaf, without sharding (so Orbax restores numpy arrays)."""
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        name = jax.tree_util.keystr(path)
        raise TypeError(f"target{name} is a {type(leaf).__name__}; leaves need .shape and .dtype")
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)


def _check_json(value: Any, where: str) -> None:
    """Raise if ``value`` would not come back unchanged from JSON (tuples, NaN, numpy scalars)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string (JSON keys are strings)")
            _check_json(item, f"{where}[{key!r}]")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}; JSON has no NaN or infinity")
    elif not (value is None or isinstance(value, str | int | bool)):
        hint = " (tuples come back as lists)" if isinstance(value, tuple) else ""
        raise TypeError(f"{where} is a {type(value).__name__}, not a JSON value{hint}")


def _flat_shapes(tree: Any) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """``{key path: (shape, dtype)}`` of a tree of arrays or Orbax array metadata."""
    flat = ocp.tree.to_flat_dict(tree)
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat.items()}


class Checkpointer:
    """Saves and restores ``(state, meta)`` in ``workdir/checkpoints`` (see module docstring).

    Args:
      workdir: the run's folder; checkpoints go to ``workdir/checkpoints``.
      keep_last: how many of the newest steps to keep (besides the best).
      keep_best: also keep the step with the lowest validation loss.
      save_every: ``save`` writes only at steps divisible by this, unless ``force=True``.
      async_save: write in a background thread; ``save`` returns once the state is copied to
        host memory. Call ``wait_until_finished`` or ``close`` before relying on the files.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        keep_last: int = 3,
        keep_best: bool = True,
        save_every: int = 1,
        async_save: bool = False,
    ):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r}: must be an integer >= 1")
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every={save_every!r}: must be an integer >= 1")
        self.directory = Path(workdir).resolve() / "checkpoints"  # Orbax needs absolute paths
        self._async_save = async_save
        self._purge_deleted()  # a kill while emptying it leaves a partial folder behind

        preserve = [checkpoint_managers.LatestN(n=keep_last)]
        if keep_best:
            preserve.append(
                checkpoint_managers.BestN(
                    get_metric_fn=_val_loss,
                    reverse=True,  # sort by descending loss; BestN keeps the tail (lowest)
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            # best_fn makes Orbax write the metrics item and rank steps in best_step().
            best_fn=_val_loss,
            best_mode="min",
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(preserve),
            save_decision_policy=checkpoint_managers.AnySavePolicy(
                [
                    checkpoint_managers.FixedIntervalPolicy(save_every),
                    # Saves when JAX's multi-host preemption notice reaches this step.
                    checkpoint_managers.PreemptionCheckpointingPolicy(),
                ]
            ),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            todelete_subdir=DELETED_SUBDIR,
        )
        registry = ocp.handlers.create_default_handler_registry(
            **{STATE_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()}
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write (cheap; no state needed)."""
        return self._manager.should_save(step)

    def save(
        self,
        step: int,
        state: Any,
        meta: dict[str, Any],
        *,
        val_loss: float | None = None,
        force: bool = False,
    ) -> bool:
        """Write ``state`` and ``meta`` as step ``step``; returns whether anything was written.

        Writes when ``step`` is a multiple of ``save_every`` (or at a multi-host preemption
        point), or when ``force``; never when the step already exists or (without ``force``)
        when a later step exists. Old steps beyond the retention rule are deleted afterwards.
        Every process must call this with the same ``step`` (see module docstring).

        Args:
          step: training step the state belongs to.
          state: pytree of arrays (jax or numpy); typed PRNG keys must be passed as key data.
          meta: JSON dict (string keys; lists, not tuples; finite floats).
          val_loss: validation loss at this step, used to keep the best step.
          force: save regardless of ``save_every`` (end of run, SIGTERM).
        """
        if step in self._manager.all_steps():
            return False
        if not (force or self.should_save(step)):
            return False
        if val_loss is not None:
            val_loss = float(val_loss)
            if not math.isfinite(val_loss):
                raise ValueError(f"val_loss at step {step} is {val_loss}; it must be finite")
        _check_json(meta, "meta")
        if self._async_save:
            self.wait_until_finished()  # the previous save's deletions land in DELETED_SUBDIR
        host_state = jax.tree_util.tree_map_with_path(_host_array, state)
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(host_state),
                    META_ITEM: ocp.args.JsonSave(meta),
                }
            ),
            metrics=None if val_loss is None else {VAL_LOSS: val_loss},
            force=True,  # the decision was made above
        )
        if not self._async_save:
            self._purge_deleted()
        return saved

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or None when there is none."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest saved validation loss, or None when none has a loss."""
        return self._manager.best_step()

    def val_loss(self, step: int) -> float | None:
        """The validation loss saved with ``step``, or None."""
        metrics = self._manager.metrics(step)
        return None if metrics is None else metrics[VAL_LOSS]

    def restore(self, step: int | None = None, *, target: Any) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of ``step`` (default: the latest complete one).

        Args:
          step: which step; None for the latest.
          target: a tree shaped like the saved state: the current state, or
            ``jax.eval_shape`` of its initialiser (leaves with ``.shape`` and ``.dtype``).

        Returns:
          ``state`` with the structure of ``target`` and numpy arrays as leaves (bit-exact copies
          of what was saved), and the ``meta`` dict.

        Raises:
          FileNotFoundError: no checkpoint (or not that step) in ``self.directory``.
          ValueError: the saved tree differs from ``target`` in keys, shapes or dtypes.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}"
            )
        abstract = jax.tree_util.tree_map_with_path(_abstract_leaf, target)
        self._check_matches(step, abstract)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardRestore(abstract),
                    META_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[STATE_ITEM], restored[META_ITEM]

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the ``meta`` dict of ``step`` (e.g. to learn the state's structure first)."""
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
        )
        return restored[META_ITEM]

    def _check_matches(self, step: int, abstract: Any) -> None:
        """Raise naming the key when the saved state differs from ``abstract``.

        Orbax would silently cast dtypes and pad or truncate shapes.
        """
        saved = _flat_shapes(self._manager.item_metadata(step)[STATE_ITEM].tree)
        wanted = _flat_shapes(abstract)
        where = f"checkpoint {self.directory / str(step)}"
        missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
        if missing or extra:
            raise ValueError(
                f"{where}: state keys differ from the target; "
                f"missing in checkpoint: {['.'.join(k) for k in missing]}, "
                f"not in target: {['.'.join(k) for k in extra]}"
            )
        for path, (shape, dtype) in wanted.items():
            if saved[path] != (shape, dtype):
                raise ValueError(
                    f"{where}: state.{'.'.join(path)} is saved as {saved[path][1]}{list(saved[path][0])}"
                    f" but the target is {dtype}{list(shape)}"
                )

    def wait_until_finished(self) -> None:
        """Block until an async save is complete on disk (no-op for synchronous saves)."""
        self._manager.wait_until_finished()
        self._purge_deleted()

    def close(self) -> None:
        """Finish pending saves and release Orbax's threads."""
        self._manager.close()
        self._purge_deleted()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _purge_deleted(self) -> None:
        """Remove steps Orbax moved to ``DELETED_SUBDIR`` (process 0 only, like Orbax's deletes)."""
        deleted = self.directory / DELETED_SUBDIR
        if jax.process_index() == 0 and deleted.exists():
            shutil.rmtree(deleted)
