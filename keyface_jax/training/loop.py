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

from keyface_jax.data.batch_layout import batch_sharding, process_rows
from keyface_jax.paths import PathLike, as_path
from keyface_jax.sharding import make_mesh
from keyface_jax.training import distributed
from keyface_jax.training.run_checkpoints import PreemptionFlag
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
    already_done: bool = False   # the workdir had reached config.train.steps: nothing was run


def already_done(step: int) -> RunSummary:
    """The summary of a run found finished (no step, restore or compilation was run)."""
    return RunSummary(start_step=step, final_step=step, losses={}, preempted=False,
                      flops_per_step=None, mean_step_seconds=None, mfu=None, already_done=True)


@dataclasses.dataclass
class LoopResult:
    final_step: int
    losses: dict[int, float]
    preempted: bool
    step_seconds: list[float]
    state: object  # the TrainState after the last step run (for exports)


@dataclasses.dataclass
class CompiledStep:
    call: object               # compiled(state, batch, aux) → (state, metrics)
    first_batch: dict          # the already-fetched first global batch
    flops: float | None


def compile_step(step_fn, state, state_shardings, aux, data, mesh) -> CompiledStep:
    """Fetches the first global batch from `data` and compiles `step_fn` once with explicit
    shardings, the state donated (so it is updated in place) and the helper modules `aux`
    replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    first_batch = next(data)
    batch_shardings = jax.tree.map(lambda _: batch_sharding(mesh), first_batch)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, replicated),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    lowered = jitted.lower(state, first_batch, aux)
    flops = compiled_flops(lowered)
    compiled = lowered.compile()
    distributed.barrier("keyface_compiled")
    return CompiledStep(compiled, first_batch, flops)


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


def run_loop(step: CompiledStep, state, aux, data, checkpoints, train_cfg, workdir: PathLike, *,
             start: int, desc: str, stop_after: int | None = None,
             after_step=None) -> LoopResult:
    """Runs steps start+1 … train_cfg.steps (or `stop_after` of them) on the global batches of
    `data` (an iterator positioned at batch `start`). Logs every `log_every` steps to
    TensorBoard/JSONL, saves on the checkpoint interval, on SIGTERM / preemption and at the end.
    `after_step(step, state)` runs after every step (previews) and returns the seconds it took,
    kept out of the step times. Closes `checkpoints` and `data` before returning."""
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
    window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
    try:
        while current < total:
            if profile and current == profile[0]:
                jax.profiler.start_trace(os.fspath(as_path(workdir) / "profile"))
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
                values.update(step_seconds=seconds, data_wait_seconds=data_wait / window_steps,
                              examples_per_second=train_cfg.batch_size / seconds,
                              mfu=mfu(step.flops, seconds, jax.device_count(), peak))
                losses[current] = values["loss"]
                writer.write(current, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", step_s=f"{seconds:.3f}")
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            if after_step is not None:
                window_start += after_step(current, state)
            checkpoints.save(current, state)
            if preemption.is_set() or checkpoints.reached_preemption(current):
                checkpoints.save(current, state, force=True)
                preempted = True
                log.warning("preempted: saved step %d; re-run the same command to resume", current)
                break
            if stop_after is not None and current - start >= stop_after:
                break
            if current < total:
                # the host's wait for the next batch; ~0 when prefetching keeps up
                fetch = time.perf_counter()
                batch = next(data)
                data_wait += time.perf_counter() - fetch
        else:
            checkpoints.save(current, state, force=True)
    finally:
        bar.close()
        data.close()   # stops the prefetch threads now, not in a __del__ at interpreter exit
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
    """The device mesh of `config.mesh`, checked against `config.train.batch_size`, with errors
    that name the config fields."""
    try:
        mesh = make_mesh(dict(config.mesh))
    except ValueError as e:
        raise ValueError(f"config.mesh {dict(config.mesh)}: {e}") from None
    try:
        process_rows(batch_sharding(mesh), int(config.train.batch_size))
    except ValueError as e:
        raise ValueError(f"config.train.batch_size={config.train.batch_size}: {e}") from None
    return mesh
