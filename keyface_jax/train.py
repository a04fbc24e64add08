"""Train a KeyFace keyframe or interpolation model (or the autoencoder), on one CPU or a pod.

    python -m keyface_jax.train --config=configs/keyframe.py:tiny --workdir=runs/kf \\
        --config.data.path=demo_data/dataset --config.train.steps=300
    python -m keyface_jax.train --config=configs/autoencoder.py:tiny --workdir=runs/ae \\
        --config.data.videos=demo_data/videos     # writes runs/ae/export for data_pipelines.prepare
    # multi-host: the same command on every host (TPU pods and SLURM are detected), or explicitly
    python -m keyface_jax.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

The workdir may be relative, absolute or gs://bucket/... Re-running the same command resumes
from the newest checkpoint in `workdir/checkpoints` (a finished run returns at once). A workdir
whose checkpoints were written under another config is refused (nothing in it is changed).
Metrics go to `workdir/tensorboard` (TensorBoard) and `workdir/metrics.jsonl`.

Exit status: 0 the run reached config.train.steps (now or before); 1 an error (the message says
which; a workdir whose checkpoints do not fit the config is one); 3 stopped early by SIGTERM or a
preemption after saving a checkpoint: run the same command again to resume.
`--verbose` (or KEYFACE_VERBOSE=1) shows the libraries' INFO logging too.
"""

from __future__ import annotations

import functools
import logging
import sys

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from keyface_jax import console, cpu_allocator
from keyface_jax.activation_sharding import activation_sharding
from keyface_jax.config_lib import dtypes, network_config
from keyface_jax.diffusion.objective import ObjectiveConfig, lpips_for_objective
from keyface_jax.models.build import abstract_network
from keyface_jax.models.keyface import build_network
from keyface_jax.data.loader import train_batches
from keyface_jax.training import distributed, weight_sources
from keyface_jax.conversion.io import CheckpointError
from keyface_jax.paths import as_path
from keyface_jax.training.loop import (RunSummary, already_done, compile_step, mesh_from_config,
                                       run_loop, summarize)
from keyface_jax.sharding import rules_from_config
from keyface_jax.training.optimizer import make_optimizer
from keyface_jax.training.previews import PreviewWriter
from keyface_jax.training.resume import start_or_resume
from keyface_jax.training.trainable import split_network
from keyface_jax.training.step import make_train_step

log = logging.getLogger("keyface_jax.train")


def objective_config(config) -> ObjectiveConfig:
    values = dict(config.objective)
    values["pixel_losses"] = tuple(values.get("pixel_losses", ()))
    return ObjectiveConfig.from_dict(dict(values, kind=config.model.kind))


def _aux_modules(config, objective, dtype):
    """Frozen helper networks of the pixel losses: {name: (graphdef, state)}."""
    aux = {}
    if objective.pixel_enabled:
        decoder = weight_sources.frozen_decoder(config.init, config.autoencoder, dtype)
        aux["decoder"] = nnx.split(decoder)
    lpips = lpips_for_objective(objective, dtype)
    if lpips is not None:
        aux["lpips"] = nnx.split(lpips)
    return aux


def _initial_params(config, net_cfg, abstract, shardings, dtype):
    """(trainable, frozen) parameter States on the mesh: loaded on the host and placed, or
    initialised directly on the devices (already sharded) for a fresh run."""
    source = weight_sources.WeightSource.from_init_config(config.init)
    loaded = weight_sources.network_state(source, net_cfg, abstract, seed=config.seed, dtype=dtype)
    log.info("initial weights: %s", source.describe())
    if loaded is not None:
        _, trainable, frozen = split_network(nnx.merge(nnx.split(abstract)[0], loaded),
                                             config.trainable)
        return jax.device_put((trainable, frozen), shardings)

    def create():
        net = build_network(net_cfg, rngs=nnx.Rngs(config.seed), dtype=dtype)
        return split_network(net, config.trainable)[1:]

    return jax.jit(create, out_shardings=shardings)()


def train(config, workdir, *, stop_after: int | None = None) -> RunSummary:
    """Runs (or resumes) training to config.train.steps. `stop_after` ends the process-local loop
    early after that many steps of this call (tests use it to simulate interruption).
    Configs with `task="autoencoder"` (configs/autoencoder.py) train the VAE instead."""
    if config.get("task", "diffusion") == "autoencoder":
        from keyface_jax.training.autoencoder_trainer import train_autoencoder
        return train_autoencoder(config, workdir, stop_after=stop_after)
    net_cfg = network_config(config.model)
    dtype, param_dtype = dtypes(config.model)
    mesh = mesh_from_config(config)
    objective = objective_config(config)
    tx, schedule = make_optimizer(config.optim)

    abstract = abstract_network(net_cfg, dtype=dtype, param_dtype=param_dtype)
    graphdef, abs_trainable, abs_frozen = split_network(abstract, config.trainable)
    initial = functools.partial(_initial_params, config, net_cfg, abstract, dtype=dtype)
    workdir = as_path(workdir)
    run = start_or_resume(config, workdir, abs_trainable, abs_frozen, tx, mesh, initial,
                          what=f"{net_cfg.kind} model")
    if run.finished:
        run.checkpoints.close()
        return already_done(run.start)
    data = train_batches(config, mesh, start=run.start)

    aux_modules = _aux_modules(config, objective, dtype)
    replicated = NamedSharding(mesh, PartitionSpec())
    aux = {name: jax.device_put(state_, replicated) for name, (_, state_) in aux_modules.items()}
    step_fn = make_train_step(graphdef, objective, tx, schedule, accum_steps=config.optim.accum_steps,
                              ema_decay=config.optim.ema_decay, nan_policy=config.train.nan_policy,
                              aux_graphdefs={n: g for n, (g, _) in aux_modules.items()})
    # Traced under the rules table: activations constrained at block boundaries (context/tensor axes).
    with activation_sharding(mesh, rules_from_config(config.mesh)):
        step = compile_step(step_fn, run.state, run.shardings, aux, data, mesh)
    previews = PreviewWriter(config, workdir, graphdef, step.first_batch, mesh, dtype)
    result = run_loop(step, run.state, aux, data, run.checkpoints, config.train, workdir,
                      start=run.start, desc=f"train {net_cfg.kind}", stop_after=stop_after,
                      after_step=previews.maybe_write)
    return summarize(run.start, result, step.flops, config.train.peak_flops_per_device)


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

    flags.DEFINE_bool("verbose", False, "also show the libraries' INFO logging (KEYFACE_VERBOSE=1)")

    def run(_):
        console.setup_logging(flags.FLAGS.verbose)
        distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                               flags.FLAGS.process_id)
        cpu_allocator.warn_if_missing()
        try:
            summary = train(config_flag.value, flags.FLAGS.workdir)
        except CheckpointError as e:        # a workdir that does not fit, weights that do not load
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        if jax.process_index() == 0:
            if summary.already_done:
                print(f"done: already trained to step {summary.final_step} in "
                      f"{flags.FLAGS.workdir} (nothing to do)", flush=True)
            else:
                last = summary.losses.get(summary.final_step)
                print(f"done: steps {summary.start_step} → {summary.final_step}, final loss {last}, "
                      f"mean step {summary.mean_step_seconds}, MFU {summary.mfu}, preempted "
                      f"{summary.preempted}"
                      + (f", eval {summary.eval_metrics}" if summary.eval_metrics else ""), flush=True)
        if jax.process_count() > 1:
            jax.distributed.shutdown()
        return 3 if summary.preempted else 0

    try:
        app.run(run, argv=argv or sys.argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
