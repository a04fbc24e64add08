"""Multi-host start-up: `jax.distributed` from explicit flags, SLURM, or a TPU pod's environment."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               local_device_ids: str = "") -> None:
    """Initialises jax.distributed when the job spans several processes; a no-op for one.

    Order: explicit arguments (also from KEYFACE_COORDINATOR / KEYFACE_NUM_PROCESSES /
    KEYFACE_PROCESS_ID); else SLURM (`SLURM_NTASKS` > 1) or a TPU pod slice (`TPU_WORKER_HOSTNAMES`
    with several hosts), both auto-detected by JAX itself."""
    coordinator_address = coordinator_address or os.environ.get("KEYFACE_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("KEYFACE_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("KEYFACE_PROCESS_ID", "-1"))
    # Generous barriers: on shared or preemptible hosts one process may finish minutes later.
    kwargs = dict(shutdown_timeout_seconds=900, initialization_timeout=900)
    if local_device_ids:
        kwargs["local_device_ids"] = [int(i) for i in local_device_ids.split(",")]
    if coordinator_address:
        if num_processes < 1 or process_id < 0:
            raise ValueError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or \
            len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize(**kwargs)
    else:
        return
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def barrier(name: str, timeout_seconds: int = 900) -> None:
    """Waits until every process arrives, through the coordination service (not a collective).

    Gloo sets up a collective context at the first cross-process computation and gives the other
    processes only 30 s to join; on shared or busy hosts compilation can skew processes by more,
    so the trainer lines them up here first."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # no public barrier with a timeout
    jax_distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_seconds * 1000)
