"""The training loop shared by every trainer (diffusion networks, the autoencoder): compile one
sharded step, then run it with logging, NaN checks, checkpoints, preemption and early stops.

A trainer builds its own state, step function and data; everything from "compile the step" to
"the run ended" lives here, so the resume / preemption guarantees hold for all of them alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from keyface_jax.sharding import make_mesh
from keyface_jax.training import batches as batch_lib
from keyface_jax.training import distributed
from keyface_jax.training.checkpointing import PreemptionFlag
from keyface_jax.training.metrics import MetricWriter, compiled_flops, mfu, peak_flops_per_device

log = logging.getLogger("keyface_jax.train")


@dataclasses.dataclass
class RunSummary:
    start_step: int
    final_step: int
    losses: dict[int, float]
    preempted: bool
    flops_per_step: float | None
    mean_step_seconds: float | None
    mfu: float | None
    eval_metrics: dict[str, float] | None = None  # end-of-run evaluation, where a trainer has one


@dataclasses.dataclass
class LoopResult:
    final_step: int
    losses: dict[int, float]
    preempted: bool
    step_seconds: list[float]
    state: dict  # the train state after the last step run (for exports)


@dataclasses.dataclass
class CompiledStep:
    call: object               # compiled(state, batch, aux) → (state, metrics)
    first_batch: dict          # the already-fetched first global batch
    batch_sharding: NamedSharding
    flops: float | None


def compile_step(step_fn, state, state_shardings, aux, data, mesh) -> CompiledStep:
    """Fetches the first batch and compiles `step_fn` once with explicit shardings, the state
    donated (so it is updated in place) and the helper modules `aux` replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    sharding = batch_lib.batch_sharding(mesh)
    first_batch = batch_lib.to_global(next(data), sharding)
    batch_shardings = jax.tree.map(lambda _: sharding, first_batch)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, replicated),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    lowered = jitted.lower(state, first_batch, aux)
    flops = compiled_flops(lowered)
    compiled = lowered.compile()
    distributed.barrier("keyface_compiled")
    return CompiledStep(compiled, first_batch, sharding, flops)


class NonFiniteWatch:
    """Keeps each step's `finite` flag on the device and checks them in bulk at log time, so the
    stop-on-NaN policy costs no per-step host sync yet names the first bad step."""

    def __init__(self):
        self.pending: list[tuple[int, jax.Array]] = []

    def add(self, step: int, flag) -> None:
        self.pending.append((step, flag))

    def first_bad(self) -> int | None:
        flags = jax.device_get([f for _, f in self.pending])
        bad = next((s for (s, _), f in zip(self.pending, flags) if not f), None)
        self.pending.clear()
        return bad


def run_loop(step: CompiledStep, state, aux, data, checkpoints, train_cfg, workdir: str, *,
             start: int, desc: str, stop_after: int | None = None,
             after_step=None) -> LoopResult:
    """Runs steps start+1 … train_cfg.steps (or `stop_after` of them). Logs every
    `log_every` steps to TensorBoard/JSONL, saves on the checkpoint interval, on SIGTERM /
    preemption and at the end. `after_step(step, state)` runs after every step (previews) and
    returns the seconds it took, kept out of the step times. Closes `checkpoints` before
    returning."""
    writer = MetricWriter(workdir)
    preemption = PreemptionFlag()
    peak = peak_flops_per_device(train_cfg.peak_flops_per_device)
    total = int(train_cfg.steps)
    profile = tuple(train_cfg.get("profile_steps") or ())
    stop_on_nan = train_cfg.nan_policy == "stop"
    watch = NonFiniteWatch()
    losses, times, preempted = {}, [], False
    current = int(start)
    batch = step.first_batch
    bar = tqdm(total=total, initial=current, desc=desc, unit="step",
               disable=None if jax.process_index() == 0 else True)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while current < total:
            if profile and current == profile[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            state, metrics = step.call(state, batch, aux)
            current += 1
            window_steps += 1
            if stop_on_nan:
                watch.add(current, metrics["finite"])
            if profile and current == profile[-1]:
                jax.profiler.stop_trace()
            bar.update()
            if current % train_cfg.log_every == 0 or current == total:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                bad = watch.first_bad() if stop_on_nan else None
                if bad is not None:
                    raise FloatingPointError(f"non-finite loss or gradients at step {bad} (the update was "
                                             "not applied); set config.train.nan_policy='skip' to go on")
                seconds = (time.perf_counter() - window_start) / window_steps
                times.append(seconds)
                values.update(step_seconds=seconds,
                              examples_per_second=train_cfg.batch_size / seconds,
                              mfu=mfu(step.flops, seconds, jax.device_count(), peak))
                losses[current] = values["loss"]
                writer.write(current, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", step_s=f"{seconds:.3f}")
                window_start, window_steps = time.perf_counter(), 0
            if after_step is not None:
                window_start += after_step(current, state)
            checkpoints.save(current, state, data)
            if preemption.is_set() or checkpoints.reached_preemption(current):
                checkpoints.save(current, state, data, force=True)
                preempted = True
                log.warning("preempted: saved step %d; re-run the same command to resume", current)
                break
            if stop_after is not None and current - start >= stop_after:
                break
            if current < total:
                batch = batch_lib.to_global(next(data), step.batch_sharding)
        else:
            checkpoints.save(current, state, data, force=True)
    finally:
        bar.close()
        checkpoints.close()
        writer.close()
    # Leave together: a process far ahead at jax.distributed's shutdown barrier can time it out.
    distributed.barrier("keyface_train_end")
    return LoopResult(current, losses, preempted, times, state)


def summarize(start: int, result: LoopResult, flops: float | None, peak_override: float = 0.0,
              eval_metrics: dict | None = None) -> RunSummary:
    """The run's summary; the first logged window (it holds the compile) is left out of the mean."""
    steady = result.step_seconds[1:] or result.step_seconds
    mean_step = float(np.mean(steady)) if steady else None
    peak = peak_flops_per_device(peak_override)
    return RunSummary(start_step=int(start), final_step=result.final_step, losses=result.losses,
                      preempted=result.preempted, flops_per_step=flops, mean_step_seconds=mean_step,
                      mfu=mfu(flops, mean_step, jax.device_count(), peak) if mean_step else None,
                      eval_metrics=eval_metrics)


def mesh_from_config(config):
    """The device mesh of `config.mesh`, with an error that names the config section."""
    try:
        return make_mesh(dict(config.mesh))
    except ValueError as e:
        raise ValueError(f"config.mesh {dict(config.mesh)}: {e}") from None
