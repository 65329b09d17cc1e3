"""Checkpoints: Orbax ``CheckpointManager`` in ``WORKDIR/checkpoints``, safe to kill at any moment.

A checkpoint is one step directory holding these items, written by Orbax:

* ``params``: the state's ``"params"`` entry, as its own item so that evaluation and export
  read the parameters without knowing the optimizer (:meth:`Checkpointer.restore_params`).
* ``state``: the rest of the state (optimizer state, step counter, ...), stored with
  ``StandardSave`` as numpy arrays. Checkpoints written before ``params`` was an item hold the
  parameters inside ``state``; they restore unchanged.
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

Damage: a step that fails to restore is handled by
:func:`research.train.checkpoint_damage.restore_newest`, which falls back to the step before it.

Read-only use (evaluation, generation, export): ``Checkpointer(workdir, read_only=True)`` never
cleans, deletes or writes under ``checkpoints/``, so it is safe while a trainer saves.

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

from research.errors import ExpectedError
from research.train import checkpoint_trees as trees
from research.train import orbax_logs
from research.train.checkpoint_trees import CheckpointMismatch

VAL_LOSS = "val_loss"
PARAMS_ITEM = "params"
STATE_ITEM = "state"
META_ITEM = "meta"
# Old steps are renamed here (atomic) and then removed; Orbax ignores it: not a step name.
DELETED_SUBDIR = "deleted"


class CheckpointWriteFailed(ExpectedError, RuntimeError):
    """A save failed (a full disk, a lost mount); earlier steps are intact. Names the step."""

    exit_code = 1


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _val_loss(metrics: dict[str, float]) -> float:
    return metrics[VAL_LOSS]


class Checkpointer:
    """Saves and restores ``(state, meta)`` in ``workdir/checkpoints`` (see module docstring).

    Args:
      workdir: the run's folder; checkpoints go to ``workdir/checkpoints``.
      keep_last: how many of the newest steps to keep (besides the best).
      keep_best: also keep the step with the lowest validation loss.
      save_every: ``save`` writes only at steps divisible by this, unless ``force=True``.
      async_save: write in a background thread; ``save`` returns once the state is copied to
        host memory. Call ``wait_until_finished`` or ``close`` before relying on the files.
      read_only: only read: no cleaning of leftovers, no deletes, no saves (evaluation, export).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        keep_last: int = 3,
        keep_best: bool = True,
        save_every: int = 1,
        async_save: bool = False,
        read_only: bool = False,
    ):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last={keep_last!r}: must be an integer >= 1")
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every={save_every!r}: must be an integer >= 1")
        self.directory = Path(workdir).resolve() / "checkpoints"  # Orbax needs absolute paths
        orbax_logs.silence_closed_loop_echoes()
        self._async_save = async_save
        self.read_only = read_only
        registry = ocp.handlers.create_default_handler_registry(
            **{
                PARAMS_ITEM: ocp.StandardCheckpointHandler(),
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                META_ITEM: ocp.JsonCheckpointHandler(),
            }
        )
        if read_only:
            with (
                orbax_logs.absl_quiet()
            ):  # Orbax warns that the directory is read-only: we asked for it
                options = ocp.CheckpointManagerOptions(
                    best_fn=_val_loss, best_mode="min", read_only=True, create=False
                )
                self._manager = ocp.CheckpointManager(
                    self.directory, options=options, handler_registry=registry
                )
            return
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
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write (cheap; no state needed)."""
        return not self.read_only and self._manager.should_save(step)

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
            A dict's ``"params"`` entry is stored as the ``params`` item.
          meta: JSON dict (string keys; lists, not tuples; finite floats).
          val_loss: validation loss at this step, used to keep the best step.
          force: save regardless of ``save_every`` (end of run, SIGTERM).
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only; it cannot save")
        if step in self._manager.all_steps():
            return False
        if not (force or self.should_save(step)):
            return False
        if val_loss is not None:
            val_loss = float(val_loss)
            if not math.isfinite(val_loss):
                raise ValueError(f"val_loss at step {step} is {val_loss}; it must be finite")
        trees.check_json(meta, "meta")
        if self._async_save:
            self.wait_until_finished()  # the previous save's deletions land in DELETED_SUBDIR
        host_state = jax.tree_util.tree_map_with_path(trees.host_array, state)
        items = {META_ITEM: ocp.args.JsonSave(meta)}
        if isinstance(host_state, dict) and PARAMS_ITEM in host_state:
            host_state = dict(host_state)
            items[PARAMS_ITEM] = ocp.args.StandardSave(host_state.pop(PARAMS_ITEM))
        if host_state:
            items[STATE_ITEM] = ocp.args.StandardSave(host_state)
        try:
            with orbax_logs.without_thread_echoes():
                saved = self._manager.save(
                    step,
                    args=ocp.args.Composite(**items),
                    metrics=None if val_loss is None else {VAL_LOSS: val_loss},
                    force=True,  # the decision was made above
                )
        except Exception as error:  # Orbax and tensorstore raise ValueError for OS errors
            raise CheckpointWriteFailed(
                f"could not write checkpoint step {step} in {self.directory} "
                f"({first_line(error)}); the steps saved before it are intact and the "
                "partial one is removed on the next start: free space and rerun to resume"
            ) from error
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

    def reload(self) -> None:
        """Read the steps on disk again (Orbax caches them; after steps were moved away)."""
        self._manager.reload()

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _require(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}"
            )
        return step

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
          CheckpointMismatch: the saved tree differs from ``target`` in keys, shapes or dtypes.
        """
        step = self._require(step)
        abstract = jax.tree_util.tree_map_with_path(trees.abstract_leaf, target)
        targets = {STATE_ITEM: abstract}
        if (self._step_dir(step) / PARAMS_ITEM).is_dir():
            if not (isinstance(abstract, dict) and PARAMS_ITEM in abstract):
                raise CheckpointMismatch(
                    f"checkpoint {self._step_dir(step)} holds params; the target has none"
                )
            rest = {k: v for k, v in abstract.items() if k != PARAMS_ITEM}
            targets = {PARAMS_ITEM: abstract[PARAMS_ITEM]} | ({STATE_ITEM: rest} if rest else {})
        for item, tree in targets.items():
            self._check_matches(step, item, tree)
        items = {item: ocp.args.StandardRestore(tree) for item, tree in targets.items()}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**items, **{META_ITEM: ocp.args.JsonRestore()})
        )
        if PARAMS_ITEM not in targets:
            return restored[STATE_ITEM], restored[META_ITEM]
        parts = {PARAMS_ITEM: restored[PARAMS_ITEM], **restored.get(STATE_ITEM, {})}
        return {key: parts[key] for key in abstract}, restored[META_ITEM]

    def restore_params(self, step: int | None = None, target: Any = None) -> Any:
        """Only the parameters of ``step`` (default: the latest), without the optimizer state.

        ``target`` (shapes and dtypes, e.g. ``jax.eval_shape`` of the model's init) is checked
        against what was saved; without it the saved tree is returned as nested dicts.
        Checkpoints from before ``params`` was an item are read from ``state``'s params.
        """
        step = self._require(step)
        old_layout = not (self._step_dir(step) / PARAMS_ITEM).is_dir()
        saved = self._item_tree(step, STATE_ITEM if old_layout else PARAMS_ITEM)
        if old_layout:
            saved = saved[PARAMS_ITEM]
        if target is None:
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
        else:
            abstract = jax.tree_util.tree_map_with_path(trees.abstract_leaf, target)
            trees.check_same(
                trees.flat_shapes(saved), trees.flat_shapes(abstract), self._step_dir(step)
            )
        if not old_layout:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(abstract)})
            )
            return restored[PARAMS_ITEM]
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(
                self._step_dir(step) / STATE_ITEM,
                args=ocp.args.PyTreeRestore(
                    item={PARAMS_ITEM: abstract},
                    restore_args=jax.tree.map(
                        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), {PARAMS_ITEM: abstract}
                    ),
                    partial_restore=True,
                ),
            )
        return restored[PARAMS_ITEM]

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the ``meta`` dict of ``step`` (e.g. to learn the state's structure first)."""
        step = self._require(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
        )
        return restored[META_ITEM]

    def _item_tree(self, step: int, item: str) -> Any:
        """The saved tree of array metadata of ``item`` (raises when it is unreadable)."""
        metadata = self._manager.item_metadata(step)[item]
        if metadata is None:
            raise FileNotFoundError(f"{self._step_dir(step) / item}: no readable metadata")
        return metadata.tree

    def _check_matches(self, step: int, item: str, abstract: Any) -> None:
        """Raise naming the key when the saved ``item`` differs from ``abstract``.

        Orbax would silently cast dtypes and pad or truncate shapes.
        """
        saved = trees.flat_shapes(self._item_tree(step, item))
        prefix = (PARAMS_ITEM,) if item == PARAMS_ITEM else ()
        trees.check_same(
            {prefix + k: v for k, v in saved.items()},
            {prefix + k: v for k, v in trees.flat_shapes(abstract).items()},
            self._step_dir(step),
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
        if not self.read_only and jax.process_index() == 0 and deleted.exists():
            shutil.rmtree(deleted)
