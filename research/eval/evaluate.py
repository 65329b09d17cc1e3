"""Evaluate a trained run: generate a split, score it, write ``eval/<split>/``.

``research evaluate --workdir DIR --split test`` writes ``DIR/eval/test/metrics.json`` (the
field's metrics, library metrics, perplexity, and when the data has ratings ``rmse``/``mae``;
no timestamps, so the same run evaluates to the same file) and ``samples.jsonl`` (user, item,
reference, generated, sampling settings, true and predicted rating). Predicted ratings are
clamped to the training split's [min, max] before scoring, as PETER/PEPLER do; with
``model.rating_head=none`` the prediction is the training split's mean rating, the baseline
every head must beat. ``research generate`` writes only samples, or prints the review (and,
where the head can rate from the text, the rating) for one conditioning text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from research import compilation_cache
from research.config import apply_override, from_json_dict, validate
from research.data.batching import make_batch
from research.data.pipeline import Dataset, load_dataset_logged
from research.eval.metrics import output_shape_metrics, text_metrics
from research.eval.pepler_compat import rating_errors
from research.eval.tables import TABLE_METRICS
from research.files import atomic_write
from research.models.build import build_generator
from research.models.generator import Generator, init_generator
from research.progress import compile_log
from research.sampling import SamplingConfig, generate_for_split
from research.train import feature_cache, frozen_init
from research.train.checkpoint import Checkpointer
from research.train.run_log import (
    config_changes,
    config_json,
    current_config,
    read_run_record,
    record_invocation,
    write_json,
)
from research.train.steps import make_eval_step, release_compiled_steps, replicate, shard

# What a batch carries about whom and what the review is for (not the targets).
CONDITIONING_INPUTS = ("user", "item", "encoder_ids", "encoder_mask", "encoder_states")


@dataclasses.dataclass
class LoadedRun:
    cfg: ml_collections.ConfigDict
    dataset: Dataset
    model: Generator
    params: dict[str, Any]
    step: int
    features: feature_cache.FeatureCache | None = None  # a frozen encoder's, computed once
    # Per split, int [len(split)]: example i reads the conditioning inputs (user, item, encoder
    # input or features) of example conditioning_of[i]; targets and ratings stay its own. For
    # counterfactual checks (experiments/shuffled_conditioning.py); empty: every example its own.
    conditioning_of: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def batches(self, split: str, batch_size: int, examples=None) -> Iterator[dict]:
        """Evaluation batches of ``split`` (or of its ``examples``), with the encoder's cached
        features when it has them, and the conditioning of ``conditioning_of[split]``."""
        for batch in self.dataset.eval_iterator(split, batch_size, examples=examples):
            batch = self.features.attach(batch, split) if self.features else batch
            if split in self.conditioning_of:
                batch = {**batch, **self._conditioning(split, batch["example"])}
            yield batch

    def _conditioning(self, split: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The conditioning inputs of the examples ``conditioning_of[split]`` gives ``rows``."""
        donors = np.where(rows >= 0, self.conditioning_of[split][np.maximum(rows, 0)], -1)
        data = self.dataset
        batch = make_batch(
            data.splits[split], donors, slice(None), data.target_buckets, data.encoder_buckets
        )
        batch = self.features.attach(batch, split) if self.features else batch
        return {k: v for k, v in batch.items() if k in CONDITIONING_INPUTS}


def run_config(workdir: str | Path, overrides: Iterable[tuple[str, str]] = ()):
    """The run's config from ``workdir/run.json`` (with later trainings' changes), overridden."""
    record = read_run_record(workdir)
    if record is None:
        raise FileNotFoundError(
            f"{Path(workdir) / 'run.json'} not found: is {workdir} a training workdir?"
        )
    cfg = from_json_dict(current_config(record))
    for key, value in overrides:
        apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def restore_params(workdir: str | Path, model: Generator | None, which: str = "best", cfg=None):
    """Parameters of the best (lowest validation loss) or latest checkpoint -> (params, step).

    Opens the checkpoints read-only (safe while a trainer saves) and reads only the
    parameters, so neither the optimizer nor its settings matter. Parts the checkpoint left
    out (the frozen base) are rebuilt from their source, which must be unchanged
    (``research/train/frozen_init.py``). With ``model`` the saved shapes are checked against
    it; without, they come as saved. ``cfg``: the run's config (default: from ``run.json``).
    """
    cfg = cfg if cfg is not None else run_config(workdir)
    with Checkpointer(workdir, read_only=True) as checkpoints:
        step = checkpoints.best_step() if which == "best" else None
        step = step if step is not None else checkpoints.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}; train first")
        left_out = checkpoints.restore_meta(step).get(frozen_init.META_KEY, {})
        target = None
        if model is not None:
            target = jax.eval_shape(lambda: init_generator(model, jax.random.key(0)))
            target = frozen_init.without(frozen_init.cast_base(cfg, target), left_out)
        params = checkpoints.restore_params(step, target)
        where = f"checkpoint {checkpoints.directory / str(step)}"
        return frozen_init.load_into(cfg, params, left_out, where), step


def load_run(workdir: str | Path, overrides=(), which: str | None = None) -> LoadedRun:
    cfg = run_config(workdir, overrides)
    compilation_cache.enable(cfg.cache.compilation_dir)
    if overrides:  # appended to run.json's invocations; the training config stays as it was
        changed = config_changes(current_config(read_run_record(workdir)), config_json(cfg))
        record_invocation(Path(workdir), cfg, "evaluate", changed)
    dataset = load_dataset_logged(cfg.data)
    model, _ = build_generator(
        cfg, dataset.num_users, dataset.num_items, rating_mean=dataset.rating_mean
    )
    params, step = restore_params(workdir, model, which or cfg.eval.checkpoint, cfg)
    features = None
    if feature_cache.wanted(cfg, model, tuple(cfg.train.trainable)):
        features = feature_cache.prepare(cfg, dataset, model, params)
    return LoadedRun(cfg, dataset, model, params, step, features)


def eval_examples(run: LoadedRun, split: str, max_examples: int) -> np.ndarray | None:
    """The seeded sample of ``max_examples`` examples of ``split`` (None: all)."""
    return run.dataset.eval_subset(split, max_examples, run.cfg.eval.subset_seed)


def split_perplexity(run: LoadedRun, split: str, max_examples: int = 0) -> float:
    """exp(mean per-token loss) of the reference targets of ``split`` (or its sample)."""
    devices = jax.local_device_count()
    step = make_eval_step(run.model)
    params = replicate(run.params, devices)
    total = count = 0.0
    examples = eval_examples(run, split, max_examples)
    for batch in run.batches(split, run.cfg.train.eval_batch_size, examples):
        batch = {k: v for k, v in batch.items() if k != "example"}
        sums = step(params, shard(batch, devices))
        total, count = total + float(sums["loss_sum"][0]), count + float(sums["tokens"][0])
    release_compiled_steps()
    return math.exp(total / max(count, 1.0))


def predicted_ratings(run: LoadedRun, split: str, examples: np.ndarray | None = None) -> np.ndarray:
    """float64 ``[len(split)]``: the predicted rating of each example (of ``examples``, NaN
    elsewhere), unclamped.

    From the conditioning alone (``Generator.predict_rating``); the training split's mean
    rating for the ``none`` head. Needs a train split with ratings.
    """
    size = len(run.dataset.splits[split])
    if not run.model.spec.rating.predicts:
        return np.full(size, run.dataset.rating_mean, np.float64)
    predict = jax.jit(lambda p, b: run.model.apply({"params": p}, b, method="predict_rating"))
    ratings = np.full(size, np.nan)
    for batch in run.batches(split, run.cfg.train.eval_batch_size, examples):
        real = batch["example"] >= 0
        inputs = {k: v for k, v in batch.items() if k not in ("example", "rating", "rating_mask")}
        ratings[batch["example"][real]] = np.asarray(predict(run.params, inputs))[real]
    return ratings


def generate_split(run: LoadedRun, split: str, max_examples: int = 0) -> list[dict[str, Any]]:
    """One record per example: user, item, reference, generated, sampling settings."""
    sampling = SamplingConfig.from_config(run.cfg.sampling)
    data = run.dataset.splits[split]
    references = run.dataset.reference_texts(split)
    examples = eval_examples(run, split, max_examples)
    batches = run.batches(split, sampling.batch_size, examples)
    has_ratings = run.dataset.rating_range is not None
    ratings = predicted_ratings(run, split, examples) if has_ratings else None
    rows = []
    for out in generate_for_split(
        run.model, run.params, batches, run.dataset.decoder_tokenizer, sampling
    ):
        record = data.records[out.example]
        rows.append(
            {
                "example": out.example,
                "user": record.user,
                "item": record.item,
                "features": list(record.features),
                "reference": references[out.example],
                "generated": out.text,
                "rating": record.rating,
                # Clamped to the training split's range, as scored.
                "predicted_rating": (
                    float(np.clip(ratings[out.example], *run.dataset.rating_range))
                    if has_ratings
                    else None
                ),
                "sampling": dataclasses.asdict(sampling),
            }
        )
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write)


def evaluate_run(workdir: str | Path, split: str = "test", overrides=()) -> dict[str, float]:
    """Generate ``split``, compute metrics, write ``workdir/eval/<split>/``; returns metrics."""
    run = load_run(workdir, overrides)
    max_examples = run.cfg.eval.max_examples
    with compile_log():
        rows = generate_split(run, split, max_examples)
    train_features = {f for r in run.dataset.splits["train"].records for f in r.features}
    has_features = bool(train_features)
    metrics = text_metrics(
        [r["reference"] for r in rows],
        [r["generated"] for r in rows],
        features=[r["features"] for r in rows] if has_features else None,
        feature_vocab=sorted(train_features) if has_features else None,
    )
    metrics.update(output_shape_metrics([r["generated"] for r in rows]))
    rated = [r for r in rows if r["rating"] is not None and r["predicted_rating"] is not None]
    if rated:
        metrics.update(
            rating_errors(
                [r["rating"] for r in rated],
                [r["predicted_rating"] for r in rated],
                *run.dataset.rating_range,
            )
        )
    with compile_log():
        metrics["perplexity"] = split_perplexity(run, split, max_examples)
    metrics["num_examples"] = len(rows)
    metrics["checkpoint_step"] = run.step
    out = Path(workdir) / "eval" / split
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "samples.jsonl", rows)
    write_json(out / "metrics.json", metrics)
    if run.cfg.train.tensorboard:
        write_tensorboard(Path(workdir), split, metrics, rows, run.step)
    print(format_metrics(metrics))
    print(f"Wrote {out / 'metrics.json'} and {out / 'samples.jsonl'}")
    return metrics


def write_tensorboard(workdir: Path, split: str, metrics, rows, step: int, samples: int = 5):
    """The metrics as scalars ``eval/<split>/<metric>`` and a few samples as a text table, at
    the evaluated checkpoint's step, beside the training curves in ``workdir/tensorboard``."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(workdir / "tensorboard")) as writer:
        for key, value in metrics.items():
            writer.add_scalar(f"eval/{split}/{key}", float(value), step)
        lines = ["| user | item | reference | generated |", "|---|---|---|---|"]
        for row in rows[:samples]:
            cells = (row["user"], row["item"], row["reference"], row["generated"])
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
        writer.add_text(f"eval/{split}/samples", "\n".join(lines), step)


def format_metrics(metrics: dict[str, float]) -> str:
    keys = [k for k in TABLE_METRICS if k in metrics]
    return "  ".join(f"{k}={metrics[k]:.3f}" for k in keys)


def generate_command(args, overrides) -> int:
    """``research generate``: a split to JSON lines, or one input (text or user+item) to stdout."""
    from research.eval.single import generate_one, input_format, rate_one

    run = load_run(args.workdir, overrides)
    if args.text is None and not (args.user or args.item):
        if not args.out:
            raise FileNotFoundError(
                "research generate needs --out FILE.jsonl, --text TEXT, or --user U --item I"
            )
        rows = generate_split(run, args.split, run.cfg.eval.max_examples)
        write_jsonl(Path(args.out), rows)
        print(f"Wrote {len(rows)} generated reviews to {args.out}")
        return 0
    print(input_format(run), file=sys.stderr)
    print(generate_one(run, args.text, args.user, args.item))
    rating = rate_one(run, args.text, args.user, args.item)
    if rating is not None:
        print(f"predicted rating: {rating:.2f}")
    return 0
