"""One run's pieces: the model built from its config, the optimizer and train step of each
stage, cached encoder features, validation losses. :func:`research.train.loop.train` drives a
:class:`Trainer`; :class:`Progress` is the non-array part of its checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections

from research.data.pipeline import Dataset
from research.models.build import build_generator
from research.models.generator import part_trains
from research.train import feature_cache, frozen_init
from research.train.optim import learning_rate_schedule, make_optimizer, trainable_labels
from research.train.steps import (
    make_eval_step,
    make_train_step,
    replicate,
    replicated_init_state,
    shard,
)


@dataclasses.dataclass
class Progress:
    """Everything besides arrays that a checkpoint must restore (saved as JSON ``meta``)."""

    stage: int = 2  # 1 = PEPLER's first stage (only stage1_trainable), 2 = the final regime
    stage2_start: int = 0  # the step at which stage 2 began (its optimizer counts from there)
    best_val_loss: float | None = None
    evals_without_improvement: int = 0
    data: dict[str, int] = dataclasses.field(default_factory=dict)


def stage_trainable(cfg: ml_collections.ConfigDict, stage: int) -> tuple[str, ...]:
    return tuple(cfg.train.stage1_trainable if stage == 1 else cfg.train.trainable)


def _shifted(schedule, offset: int):
    """``schedule`` as seen by an optimizer whose update count starts at step ``offset``."""
    return lambda count: schedule(count + offset)


class Trainer:
    """Holds one run's pieces; :func:`research.train.loop.train` drives it."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: Path, dataset: Dataset):
        self.cfg, self.workdir, self.dataset = cfg, workdir, dataset
        self.devices = jax.local_device_count()
        self.processes = jax.process_count()
        per_process = cfg.train.batch_size // self.processes
        if per_process * self.processes != cfg.train.batch_size or per_process % (
            self.devices * cfg.train.accum_steps
        ):
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} must split evenly over "
                f"{self.processes} processes x {self.devices} devices x "
                f"train.accum_steps={cfg.train.accum_steps}"
            )
        self.schedule = learning_rate_schedule(
            cfg.train.learning_rate,
            cfg.train.steps,
            cfg.train.warmup_steps,
            cfg.train.schedule,
            cfg.train.end_lr_fraction,
        )
        root = jax.random.key(cfg.seed)
        init_key, self.dropout_seed = jax.random.split(root)
        self.model, params = build_generator(
            cfg, dataset.num_users, dataset.num_items, init_key, dataset.rating_mean
        )
        # The frozen base: checkpoints leave it out (frozen_init.py); train.frozen_dtype.
        sizes = {"num_users": dataset.num_users, "num_items": dataset.num_items}
        sizes["rating_mean"] = dataset.rating_mean
        self.frozen = frozen_init.frozen_parts(cfg, params, sizes)
        self.initial_params = frozen_init.cast_base(cfg, params)
        self.eval_step = make_eval_step(self.model)
        self.features: feature_cache.FeatureCache | None = None

    def state_on_devices(self, restored, tx) -> dict:
        """The replicated train state: ``restored`` (host arrays) or, when None, a fresh one.

        The initial parameters keep only their shapes from then on (the optimizer, the steps'
        labels and a checkpoint's target read nothing else): the state holds its own copy, and
        the run would otherwise hold a second copy of the model to its end.
        """
        if restored is None:
            state = replicated_init_state(self.initial_params, tx, self.devices)
        else:
            state = replicate(restored, self.devices)
        self.initial_params = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.initial_params
        )
        return state

    def use_features(self, stage: int, params) -> None:
        """Read a frozen encoder's features from the cache in ``stage``; run it live otherwise."""
        self.features = None
        if feature_cache.wanted(self.cfg, self.model, stage_trainable(self.cfg, stage)):
            self.features = feature_cache.prepare(self.cfg, self.dataset, self.model, params)

    def host_batch(self, batch: dict, split: str) -> dict:
        """A batch as the steps read it: cached encoder features attached, ``example`` dropped."""
        if self.features is not None:
            batch = self.features.attach(batch, split)
        return {k: v for k, v in batch.items() if k != "example"}

    def optimizer(self, stage: int, first_step: int = 0):
        """The optimizer of ``stage``, created at step ``first_step``.

        A new optimizer counts its updates from 0; shifting the schedule by ``first_step`` keeps
        it on the run's learning-rate schedule (the one the metrics report) instead of starting
        the warmup again.
        """
        return make_optimizer(
            self.initial_params,
            stage_trainable(self.cfg, stage),
            _shifted(self.schedule, first_step) if first_step else self.schedule,
            weight_decay=self.cfg.train.weight_decay,
            clip_norm=self.cfg.train.clip_norm or None,
        )

    def train_step(self, stage: int, tx):
        trainable = stage_trainable(self.cfg, stage)
        labels = trainable_labels(self.initial_params, trainable)
        model = self.model.clone(
            frozen_encoder=not part_trains(self.model.spec, "encoder", trainable)
        )
        weights = {"text_weight": self.cfg.train.text_weight}
        weights["rating_weight"] = self.cfg.train.rating_weight
        return make_train_step(model, tx, labels, self.schedule, **weights)

    def validation_examples(self):
        """The seeded sample of max_eval_batches batches (None: the whole split)."""
        count = self.cfg.train.max_eval_batches * self.cfg.train.eval_batch_size
        return self.dataset.eval_subset("validation", count, self.cfg.eval.subset_seed)

    def evaluate(self, params_replicated, split: str = "validation") -> dict[str, float]:
        """Losses over ``split`` (validation: its seeded max_eval_batches sample).

        ``loss``: mean per target token; with a rating head ``rating_mse``; ``objective``: both
        weighted as in training (checkpoints and the two-stage switch follow it).
        """
        examples = self.validation_examples() if split == "validation" else None
        batches = self.dataset.eval_iterator(
            split, self.cfg.train.eval_batch_size, jax.process_index(), self.processes, examples
        )
        sums = []  # on the devices until the pass is over
        for batch in batches:
            batch = self.host_batch(batch, split)
            sums.append(self.eval_step(params_replicated, shard(batch, self.devices)))
        totals = {key: sum(float(s[key][0]) for s in jax.device_get(sums)) for key in sums[0]}
        loss = totals["loss_sum"] / max(totals["tokens"], 1.0)
        losses = {"loss": loss, "objective": self.cfg.train.text_weight * loss}
        if "rated" in totals:
            losses["rating_mse"] = totals["rating_sq_error"] / max(totals["rated"], 1.0)
            losses["objective"] += self.cfg.train.rating_weight * losses["rating_mse"]
        return losses
