"""Multi-host start-up through ``jax.distributed``.

A run is multi-process when ``distributed.coordinator_address`` / ``num_processes`` are set in
the config, when the environment names a coordinator (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), or when JAX can detect the cluster by itself (SLURM
with more than one task, Cloud TPU pods). Every process then runs the same command; each reads
only its slice of every global batch, and only process 0 writes logs.
"""

from __future__ import annotations

import os

import jax
import ml_collections

_initialized = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default


def initialize(dist: ml_collections.ConfigDict) -> None:
    """Call ``jax.distributed.initialize`` when this run spans several processes."""
    global _initialized
    if _initialized:
        return
    address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = dist.num_processes or _env_int("JAX_NUM_PROCESSES", 0)
    process_id = dist.process_id if dist.process_id >= 0 else _env_int("JAX_PROCESS_ID", -1)
    slurm_multi = _env_int("SLURM_NTASKS", 1) > 1
    tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if not (address or num_processes > 1 or slurm_multi or tpu_pod):
        return
    # CPU processes need a collectives backend to reduce across hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        if num_processes < 1 or process_id < 0:
            raise ValueError(
                "distributed.coordinator_address is set; also set distributed.num_processes "
                "and distributed.process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
            )
        jax.distributed.initialize(address, num_processes, process_id)
    else:
        jax.distributed.initialize()  # JAX's own SLURM / TPU detection
    _initialized = True


def is_primary() -> bool:
    return jax.process_index() == 0
