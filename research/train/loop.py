"""The training loop: data -> pmapped steps -> evaluation -> checkpoints, resumable to the bit.

``train(cfg, workdir)`` is what ``research train`` runs. Running it again on the same workdir
resumes from the latest checkpoint: parameters, optimizer state, step, the data iterator's
position and the two-stage schedule's progress all come back, and dropout keys depend only on
(seed, step, device), so an interrupted run ends bitwise equal to an uninterrupted one.

SIGTERM/SIGINT finish the current step, save, and return normally. A non-finite loss (or
gradient norm) raises :class:`research.train.step_metrics.TrainingDiverged` naming the step, before that step is saved.

The loop does not wait for the devices between steps: metrics stay on the devices until the
next log line, save or evaluation (a diverged step leaves the state unchanged; the loop stops
when it sees the step's metrics), the state is copied to the host only for a checkpoint that is
written, and the next batch is read and copied to the devices while the current step runs.
A stage whose encoder is frozen reads its features, computed once per example
(``research/train/feature_cache.py``); a stage that trains the encoder runs it live.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
from pathlib import Path

import jax
import ml_collections
from flax import jax_utils

from research import compilation_cache
from research.data.pipeline import REPORT_FILE, load_dataset_logged, subset_record
from research.files import atomic_write
from research.models.generator import parameter_summary
from research.progress import compile_log, progress_bar
from research.train import distributed, frozen_init
from research.train.checkpoint import Checkpointer
from research.train.checkpoint_damage import restore_newest
from research.train.run_log import (
    MetricsLog,
    RunConfigChanged,
    check_resumable,
    read_metrics,
    record_invocation,
    structural_hash,
    write_json,
)
from research.train.step_metrics import StepMetrics
from research.train.steps import (
    compile_ahead,
    init_state,
    release_compiled_steps,
    replicate,
    replicated_init_state,
    shard,
    to_devices,
)
from research.train.trainer import Progress, Trainer, stage_trainable
from research.train.workdir_lock import trainer_lock


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal_name: str | None = None

    def __call__(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def validation_line(step: int, loss: float, best: float) -> str:
    """What training prints after each validation pass."""
    return (
        f"step {step}: validation loss {loss:.4f}, perplexity {math.exp(min(loss, 50.0)):.2f} "
        f"(best so far: loss {best:.4f}, perplexity {math.exp(min(best, 50.0)):.2f})"
    )


def _host(tree):
    return jax.device_get(jax_utils.unreplicate(tree))


def _truncate_metrics(workdir: Path, step: int) -> None:
    """Drop metric rows past ``step``: they belong to steps a killed run will redo."""
    rows = [r for r in read_metrics(workdir) if r["step"] <= step]
    path = workdir / "metrics.jsonl"
    if path.exists():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, command: list[str] | None = None):
    """Train (or resume) the run of ``cfg`` in ``workdir``; returns a summary dict.

    One trainer per workdir (``WorkdirBusy`` otherwise). Before anything is written, a resume
    is checked against ``run.json`` (``RunConfigChanged``), and a finished run is left as it is.
    """
    distributed.initialize(cfg.distributed)
    compilation_cache.enable(cfg.cache.compilation_dir)
    workdir = Path(workdir)
    primary = distributed.is_primary()
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    with trainer_lock(workdir) if primary else contextlib.nullcontext():
        changed = check_resumable(workdir, cfg)
        with Checkpointer(workdir, read_only=True) as existing:
            done = existing.latest_step()
        if done is not None and done >= cfg.train.steps:
            if primary:
                print(f"{workdir} is already complete at step {done}; nothing changed.")
            return {"step": done, "already_complete": True}
        if primary:
            record_invocation(workdir, cfg, "train", changed, command)
        try:
            return _start(cfg, workdir)
        finally:
            release_compiled_steps()


def _start(cfg: ml_collections.ConfigDict, workdir: Path):
    primary = distributed.is_primary()
    dataset = load_dataset_logged(cfg.data, workdir if primary else None, verbose=primary)
    trainer = Trainer(cfg, workdir, dataset)
    if primary:
        write_json(workdir / "validation_subset.json", subset_record(trainer.validation_examples()))
    checkpoints = Checkpointer(
        workdir, keep_last=cfg.train.keep_checkpoints, save_every=cfg.train.checkpoint_every
    )
    progress = Progress(stage=1 if cfg.train.two_stage else 2)
    data = dataset.train_iterator(
        cfg.train.batch_size, cfg.seed, jax.process_index(), trainer.processes
    )

    def target_for(meta):
        # The optimizer state's structure depends on the stage, saved in meta.
        saved = meta["progress"]
        tx = trainer.optimizer(saved["stage"], saved.get("stage2_start", 0))
        target = jax.eval_shape(lambda p: init_state(p, tx), trainer.initial_params)
        left_out = meta.get(frozen_init.META_KEY, {})
        return {**target, "params": frozen_init.without(target["params"], left_out)}

    resumed = restore_newest(checkpoints, target_for)
    start, state = None, None
    if resumed is None:
        if primary:
            print(parameter_summary(trainer.initial_params, stage_trainable(cfg, progress.stage)))
    else:
        start, state, meta = resumed
        del resumed  # the restored host state is freed once it is on the devices
        where = checkpoints.directory / str(start)
        _check_config_hash(cfg, meta, where)
        left_out = meta.get(frozen_init.META_KEY, {})
        frozen_init.check_unchanged(left_out, trainer.frozen, f"checkpoint {where}")
        state["params"] = frozen_init.with_base(
            state["params"],
            {part: frozen_init.base_of(trainer.initial_params, part) for part in left_out},
        )
        progress = Progress(**meta["progress"])
        data.restore(progress.data)
        if primary:
            print(f"Resuming {workdir} from step {start} (stage {progress.stage}).")
    tx = trainer.optimizer(progress.stage, progress.stage2_start)
    trainer.use_features(
        progress.stage, trainer.initial_params if state is None else state["params"]
    )
    if primary:
        # Also without a checkpoint: a run killed before its first save logged steps it redoes.
        _truncate_metrics(workdir, start or 0)
        if trainer.features is not None:
            dataset.report["encoder_feature_cache"] = trainer.features.report()
            write_json(workdir / REPORT_FILE, dataset.report)
    with compile_log() if primary else contextlib.nullcontext():
        state = trainer.state_on_devices(state, tx)
        return _run(cfg, workdir, trainer, checkpoints, progress, data, tx, state, start or 0)


def _check_config_hash(cfg, meta: dict, where: Path) -> None:
    saved = meta.get("config_hash")  # absent in checkpoints written before it was saved
    if saved is not None and saved != structural_hash(cfg):
        raise RunConfigChanged(
            f"checkpoint {where} was written under another config (structural hash "
            f"{saved[:12]}, this config's {structural_hash(cfg)[:12]}); use a new --workdir"
        )


def _run(cfg, workdir, trainer, checkpoints, progress, data, tx, state, step):
    primary = distributed.is_primary()
    log = MetricsLog(workdir, primary, cfg.train.tensorboard)
    step_fn = trainer.train_step(progress.stage, tx)
    seed_key = replicate(trainer.dropout_seed, trainer.devices)
    stop = _StopRequest()
    bar = progress_bar(
        cfg.train.steps, "train", "step", step, not primary, every=cfg.train.log_every
    )
    step_metrics, last_loss = StepMetrics(checkpoints, bar), float("nan")

    def on_devices(raw: dict):
        batch = shard(trainer.host_batch(raw, "train"), trainer.devices, cfg.train.accum_steps)
        return to_devices(batch, trainer.devices)

    def next_batch():
        """The next batch as read, on its way to the devices, and the data position after it."""
        raw = next(data)
        return raw, on_devices(raw), data.state()

    config_hash = structural_hash(cfg)

    def save(force: bool, val_loss: float | None = None) -> None:
        # The state comes to the host only for a checkpoint that is written.
        if step in checkpoints.all_steps() or not (force or checkpoints.should_save(step)):
            return
        step_metrics.fetch()  # a diverged step must not be saved
        kept = {**state, "params": frozen_init.without(state["params"], trainer.frozen)}
        checkpoints.save(
            step,
            _host(kept),
            {
                "progress": dataclasses.asdict(progress),
                "seed": cfg.seed,
                "config_hash": config_hash,
                frozen_init.META_KEY: trainer.frozen,
            },
            val_loss=val_loss,
            force=True,  # decided above
        )

    upcoming = next_batch() if step < cfg.train.steps else None
    if upcoming is not None:
        compile_ahead(step_fn, state, upcoming[1], seed_key)
    with stop.installed():
        while step < cfg.train.steps:
            _, batch, progress.data = upcoming
            state, metrics = step_fn(state, batch, seed_key)
            step += 1
            step_metrics.add(step, metrics)
            if step < cfg.train.steps:
                upcoming = next_batch()  # read and copied while the step runs
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                row = step_metrics.fetch()
                last_loss, tokens_per_s = row["loss"], step_metrics.tokens_per_s()
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                log.write(
                    step,
                    "train",
                    {
                        "loss": last_loss,
                        "perplexity": math.exp(min(last_loss, 50.0)),
                        "learning_rate": row["learning_rate"],
                        "tokens_per_s": tokens_per_s,
                        "grad_norm": row["grad_norm"],
                        **{k: row[k] for k in ("rating_mse",) if k in row},
                    },
                )
            bar.update(1)  # after set_postfix: a log file's line shows this step's loss
            val_loss = None
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                step_metrics.fetch()
                losses = trainer.evaluate(state["params"])
                val_loss = losses.pop("objective")
                perplexity = math.exp(min(losses["loss"], 50.0))
                log.write(step, "validation", {**losses, "perplexity": perplexity})
                improved = progress.best_val_loss is None or val_loss < progress.best_val_loss
                progress.best_val_loss = val_loss if improved else progress.best_val_loss
                progress.evals_without_improvement = (
                    0 if improved else progress.evals_without_improvement + 1
                )
                if primary:
                    line = validation_line(step, val_loss, progress.best_val_loss)
                    if "rating_mse" in losses:  # val_loss is then the weighted objective
                        line += f"; text loss {losses['loss']:.4f}, rating MSE {losses['rating_mse']:.4f}"
                    bar.write(line)
            switch = progress.stage == 1 and (
                step >= cfg.train.stage1_max_steps
                or progress.evals_without_improvement >= cfg.train.stage1_patience
            )
            if switch:
                # Switch before saving: this step's checkpoint must resume in stage 2. (Saved in
                # stage 1, a resumed run would take one stage-1 step too many.)
                step_metrics.fetch()
                progress.stage, progress.evals_without_improvement = 2, 0
                progress.stage2_start = step
                tx = trainer.optimizer(2, step)
                params = _host(state["params"])
                state = {
                    **replicated_init_state(params, tx, trainer.devices),
                    "step": replicate(_host(state["step"]), trainer.devices),
                }
                step_fn = trainer.train_step(2, tx)
                trainer.use_features(2, params)
                del params  # the host copy: the state holds the parameters
                if step < cfg.train.steps:  # made for stage 1's encoder inputs
                    upcoming = (upcoming[0], on_devices(upcoming[0]), upcoming[2])
                    compile_ahead(step_fn, state, upcoming[1], seed_key)
                if primary:
                    bar.write(f"step {step}: stage 2, training {stage_trainable(cfg, 2)}")
            # The switch point is a resume point.
            save(force=step == cfg.train.steps or switch, val_loss=val_loss)
            if stop.signal_name:
                save(force=True)
                bar.close()
                checkpoints.close()
                log.close()
                message = f"{stop.signal_name} received: saved step {step} in {checkpoints.directory}; rerun the same command to resume."
                if primary:
                    print(message)
                return {"step": step, "stopped_by": stop.signal_name, "loss": last_loss}
    save(force=True)
    bar.close()
    checkpoints.close()
    log.close()
    return {"step": step, "loss": last_loss, "best_val_loss": progress.best_val_loss}
