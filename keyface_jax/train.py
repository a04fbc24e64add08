"""Train a KeyFace keyframe or interpolation model, on one CPU or a pod.

    python -m keyface_jax.train --config=configs/keyframe.py:tiny --workdir=runs/kf \\
        --config.data.path=demo_data/dataset --config.train.steps=300
    # multi-host: the same command on every host (TPU pods and SLURM are detected), or explicitly
    python -m keyface_jax.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

Re-running the same command resumes from the newest good checkpoint in `workdir/checkpoints`.
Metrics go to `workdir/tensorboard` (TensorBoard) and `workdir/metrics.jsonl`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from keyface_jax.config_lib import dtypes, network_config
from keyface_jax.diffusion.objective import ObjectiveConfig, lpips_for_objective
from keyface_jax.models.build import abstract_network
from keyface_jax.models.keyface import build_network
from keyface_jax.sharding import make_mesh
from keyface_jax.training import batches as batch_lib
from keyface_jax.training import distributed, initialization
from keyface_jax.training.checkpointing import PreemptionFlag, RunCheckpointer
from keyface_jax.training.metrics import MetricWriter, compiled_flops, mfu, peak_flops_per_device
from keyface_jax.training.optimizer import make_optimizer
from keyface_jax.training.state import abstract_like, init_train_state, split_network, state_shardings
from keyface_jax.training.step import make_train_step

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


def objective_config(config) -> ObjectiveConfig:
    values = dict(config.objective)
    values["pixel_losses"] = tuple(values.get("pixel_losses", ()))
    return ObjectiveConfig.from_dict(dict(values, kind=config.model.kind))


def _mesh_or_error(config):
    try:
        return make_mesh(dict(config.mesh))
    except ValueError as e:
        raise ValueError(f"config.mesh {dict(config.mesh)}: {e}") from None


def _data_iterator(config, net_cfg, mesh):
    path = config.data.path
    if not path:
        raise ValueError("config.data.path is empty: give a prepared dataset folder "
                         "(python -m data_pipelines.prepare) or 'synthetic'")
    if path == "synthetic":
        return batch_lib.SyntheticBatches(net_cfg, config.train.batch_size, config.num_frames, config.seed)
    from keyface_jax.data.loader import make_train_iterator  # grain + tfds only when used
    return make_train_iterator(config, mesh)


def _aux_modules(config, objective, dtype):
    """Frozen helper networks of the pixel losses: {name: (graphdef, state)}."""
    aux = {}
    if objective.pixel_enabled:
        decoder = initialization.frozen_decoder(config.init, config.autoencoder, dtype)
        aux["decoder"] = nnx.split(decoder)
    lpips = lpips_for_objective(objective, dtype)
    if lpips is not None:
        aux["lpips"] = nnx.split(lpips)
    return aux


def _initial_params(config, net_cfg, abstract, graphdef, shardings, dtype):
    """(trainable, frozen) parameter States on the mesh: loaded on the host and placed, or
    initialised directly on the devices (already sharded) for a fresh run."""
    host = initialization.pretrained_network(config.init, net_cfg, abstract, config.seed, dtype)
    if host is not None:
        _, trainable, frozen = split_network(host, config.trainable)
        return jax.device_put((trainable, frozen), shardings)

    def create():
        net = build_network(net_cfg, rngs=nnx.Rngs(config.seed), dtype=dtype)
        return split_network(net, config.trainable)[1:]

    return jax.jit(create, out_shardings=shardings)()


class _NonFiniteWatch:
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


def train(config, workdir: str, *, stop_after: int | None = None) -> RunSummary:
    """Runs (or resumes) training to config.train.steps. `stop_after` ends the process-local loop
    early after that many steps of this call (tests use it to simulate interruption)."""
    net_cfg = network_config(config.model)
    dtype, param_dtype = dtypes(config.model)
    dtype = None if dtype == jnp.float32 else dtype
    mesh = _mesh_or_error(config)
    batch_lib.check_batch_size(config.train.batch_size, mesh)
    objective = objective_config(config)
    tx, schedule = make_optimizer(config.optim)

    abstract = abstract_network(net_cfg, dtype=dtype, param_dtype=param_dtype)
    graphdef, abs_trainable, abs_frozen = split_network(abstract, config.trainable)
    with_ema = config.optim.ema_decay > 0
    init_state = functools.partial(init_train_state, tx=tx, seed=config.seed, ema=with_ema)
    abstract_state = jax.eval_shape(init_state, abs_trainable, abs_frozen)
    try:
        shardings = state_shardings(abstract_state, abs_trainable, abs_frozen, mesh)
    except ValueError as e:
        raise ValueError(f"the {net_cfg.kind} model cannot shard on mesh {dict(mesh.shape)}: {e}") from None

    data = _data_iterator(config, net_cfg, mesh)
    checkpoints = RunCheckpointer(os.path.join(workdir, "checkpoints"),
                                  every=config.train.checkpoint_every, keep=config.train.keep_checkpoints)
    start, state = checkpoints.restore_latest(abstract_like(abstract_state, shardings), data)
    if state is None:
        start = 0
        params = _initial_params(config, net_cfg, abstract, graphdef,
                                 (shardings["params"], shardings["frozen"]), dtype)
        state = jax.jit(init_state, out_shardings=shardings)(*params)
    else:
        log.info("resumed from %s at step %d", checkpoints.directory, start)

    aux_modules = _aux_modules(config, objective, dtype)
    replicated = NamedSharding(mesh, PartitionSpec())
    aux = {name: jax.device_put(state_, replicated) for name, (_, state_) in aux_modules.items()}
    step_fn = make_train_step(graphdef, objective, tx, schedule, accum_steps=config.optim.accum_steps,
                              ema_decay=config.optim.ema_decay, nan_policy=config.train.nan_policy,
                              aux_graphdefs={n: g for n, (g, _) in aux_modules.items()})
    sharding = batch_lib.batch_sharding(mesh)
    first_batch = batch_lib.to_global(next(data), sharding)
    batch_shardings = jax.tree.map(lambda _: sharding, first_batch)
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_shardings, replicated),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
    lowered = jitted.lower(state, first_batch, aux)
    flops = compiled_flops(lowered)
    compiled = lowered.compile()
    distributed.barrier("keyface_compiled")

    writer = MetricWriter(workdir)
    preemption = PreemptionFlag()
    peak = peak_flops_per_device(config.train.peak_flops_per_device)
    total = int(config.train.steps)
    profile = tuple(config.train.profile_steps or ())
    watch = _NonFiniteWatch()
    losses, times, preempted = {}, [], False
    step = int(start)
    batch = first_batch
    bar = tqdm(total=total, initial=step, desc=f"train {net_cfg.kind}", unit="step",
               disable=None if jax.process_index() == 0 else True)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < total:
            if profile and step == profile[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            state, metrics = compiled(state, batch, aux)
            step += 1
            window_steps += 1
            if config.train.nan_policy == "stop":
                watch.add(step, metrics["finite"])
            if profile and step == profile[-1]:
                jax.profiler.stop_trace()
            bar.update()
            if step % config.train.log_every == 0 or step == total:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                bad = watch.first_bad() if config.train.nan_policy == "stop" else None
                if bad is not None:
                    raise FloatingPointError(f"non-finite loss or gradients at step {bad} (the update was "
                                             "not applied); set config.train.nan_policy='skip' to go on")
                seconds = (time.perf_counter() - window_start) / window_steps
                times.append(seconds)
                values.update(step_seconds=seconds,
                              examples_per_second=config.train.batch_size / seconds,
                              mfu=mfu(flops, seconds, jax.device_count(), peak))
                losses[step] = values["loss"]
                writer.write(step, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", step_s=f"{seconds:.3f}")
                window_start, window_steps = time.perf_counter(), 0
            checkpoints.save(step, state, data)
            if preemption.is_set() or checkpoints.reached_preemption(step):
                checkpoints.save(step, state, data, force=True)
                preempted = True
                log.warning("preempted: saved step %d; re-run the same command to resume", step)
                break
            if stop_after is not None and step - start >= stop_after:
                break
            if step < total:
                batch = batch_lib.to_global(next(data), sharding)
        else:
            checkpoints.save(step, state, data, force=True)
    finally:
        bar.close()
        checkpoints.close()
        writer.close()
    # Leave together: a process far ahead at jax.distributed's shutdown barrier can time it out.
    distributed.barrier("keyface_train_end")
    steady = times[1:] or times
    mean_step = float(np.mean(steady)) if steady else None
    return RunSummary(start_step=int(start), final_step=step, losses=losses, preempted=preempted,
                      flops_per_step=flops, mean_step_seconds=mean_step,
                      mfu=mfu(flops, mean_step, jax.device_count(), peak) if mean_step else None)


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "configs/<stage>.py:<variant>",
                                                  lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics, previews")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host)")
    flags.DEFINE_integer("num_processes", 0, "processes in the job (multi-host)")
    flags.DEFINE_integer("process_id", -1, "this process's index (multi-host)")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(_):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                               flags.FLAGS.process_id)
        summary = train(config_flag.value, flags.FLAGS.workdir)
        if jax.process_index() == 0:
            last = summary.losses.get(summary.final_step)
            print(f"done: steps {summary.start_step} → {summary.final_step}, final loss {last}, "
                  f"mean step {summary.mean_step_seconds}, MFU {summary.mfu}, preempted {summary.preempted}",
                  flush=True)
        if jax.process_count() > 1:
            jax.distributed.shutdown()

    app.run(run, argv=argv or sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
