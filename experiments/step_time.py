"""CPU and wall time of one config's compiled train step, for sizing experiments.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 .venv/bin/python experiments/step_time.py \
        experiments/configs/lm_pretrain_amazon_mi.py 14 [KEY=VALUE ...]

Builds the run's trainer as ``research train`` does, takes STEPS train steps on its batches and
prints one JSON line per step, then the means over the steps that did not compile. Process CPU
time (``time.process_time``, all threads) stays meaningful on a machine shared with other jobs,
where wall time does not. Nothing is written to disk.
"""

import json
import sys
import tempfile
import time

import jax

from research.config import load_config
from research.data.pipeline import load_dataset
from research.train.steps import init_state, replicate, shard
from research.train.trainer import Trainer


def main(config: str, steps: str, *overrides: str) -> None:
    cfg = load_config(config, [o.split("=", 1) for o in overrides])
    dataset = load_dataset(cfg.data)
    trainer = Trainer(cfg, tempfile.mkdtemp(), dataset)
    tx = trainer.optimizer(2)
    state = replicate(init_state(trainer.initial_params, tx), trainer.devices)
    step_fn = trainer.train_step(2, tx)
    key = replicate(trainer.dropout_seed, trainer.devices)
    batches = dataset.train_iterator(cfg.train.batch_size, cfg.seed)
    rows, seen = [], set()
    for step in range(int(steps)):
        batch = {k: v for k, v in next(batches).items() if k != "example"}
        shape = tuple(batch["decoder_ids"].shape)
        wall, cpu = time.perf_counter(), time.process_time()
        state, metrics = step_fn(state, shard(batch, trainer.devices, cfg.train.accum_steps), key)
        jax.block_until_ready(metrics["loss"])
        row = {
            "step": step,
            "shape": shape,
            "compiled": shape not in seen,
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
        }
        seen.add(shape)
        rows.append(row)
        print(json.dumps(row), flush=True)
    warm = [r for r in rows if not r["compiled"]] or rows
    mean = {k: sum(r[k] for r in warm) / len(warm) for k in ("wall_s", "cpu_s")}
    print(json.dumps({"config": config, "overrides": overrides, "steps": len(warm), **mean}))


if __name__ == "__main__":
    main(*sys.argv[1:])
