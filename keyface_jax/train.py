"""Train a KeyFace keyframe or interpolation model (or the autoencoder), on one CPU or a pod.

    python -m keyface_jax.train --config=configs/keyframe.py:tiny --workdir=runs/kf \\
        --config.data.path=demo_data/dataset --config.train.steps=300
    python -m keyface_jax.train --config=configs/autoencoder.py:tiny --workdir=runs/ae \\
        --config.data.videos=demo_data/videos     # writes runs/ae/export for data_pipelines.prepare
    # multi-host: the same command on every host (TPU pods and SLURM are detected), or explicitly
    python -m keyface_jax.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

Re-running the same command resumes from the newest good checkpoint in `workdir/checkpoints`.
Metrics go to `workdir/tensorboard` (TensorBoard) and `workdir/metrics.jsonl`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from keyface_jax import cpu_allocator
from keyface_jax.activation_sharding import activation_sharding
from keyface_jax.config_lib import dtypes, network_config
from keyface_jax.diffusion.objective import ObjectiveConfig, lpips_for_objective
from keyface_jax.models.build import abstract_network
from keyface_jax.models.keyface import build_network
from keyface_jax.sharding import rules_from_config
from keyface_jax.training import batches as batch_lib
from keyface_jax.training import distributed, initialization
from keyface_jax.training.checkpointing import RunCheckpointer
from keyface_jax.training.loop import RunSummary, compile_step, mesh_from_config, run_loop, summarize
from keyface_jax.training.optimizer import make_optimizer
from keyface_jax.training.previews import PreviewWriter
from keyface_jax.training.state import abstract_like, init_train_state, split_network, state_shardings
from keyface_jax.training.step import make_train_step

log = logging.getLogger("keyface_jax.train")


def objective_config(config) -> ObjectiveConfig:
    values = dict(config.objective)
    values["pixel_losses"] = tuple(values.get("pixel_losses", ()))
    return ObjectiveConfig.from_dict(dict(values, kind=config.model.kind))


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


def train(config, workdir: str, *, stop_after: int | None = None) -> RunSummary:
    """Runs (or resumes) training to config.train.steps. `stop_after` ends the process-local loop
    early after that many steps of this call (tests use it to simulate interruption).
    Configs with `task="autoencoder"` (configs/autoencoder.py) train the VAE instead."""
    if config.get("task", "diffusion") == "autoencoder":
        from keyface_jax.training.autoencoder_trainer import train_autoencoder
        return train_autoencoder(config, workdir, stop_after=stop_after)
    net_cfg = network_config(config.model)
    dtype, param_dtype = dtypes(config.model)
    dtype = None if dtype == jnp.float32 else dtype
    mesh = mesh_from_config(config)
    batch_lib.check_batch_size(config.train.batch_size, mesh)
    objective = objective_config(config)
    tx, schedule = make_optimizer(config.optim)

    abstract = abstract_network(net_cfg, dtype=dtype, param_dtype=param_dtype)
    graphdef, abs_trainable, abs_frozen = split_network(abstract, config.trainable)
    with_ema = config.optim.ema_decay > 0
    init_state = functools.partial(init_train_state, tx=tx, seed=config.seed, ema=with_ema)
    abstract_state = jax.eval_shape(init_state, abs_trainable, abs_frozen)
    try:
        shardings = state_shardings(abstract_state, abs_trainable, abs_frozen, mesh,
                                    rules=rules_from_config(config.mesh))
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
    # Traced under the rules table: activations constrained at block boundaries (context/tensor axes).
    with activation_sharding(mesh, rules_from_config(config.mesh)):
        step = compile_step(step_fn, state, shardings, aux, data, mesh)
    previews = PreviewWriter(config, workdir, graphdef, step.first_batch, mesh, dtype)
    result = run_loop(step, state, aux, data, checkpoints, config.train, workdir, start=int(start),
                      desc=f"train {net_cfg.kind}", stop_after=stop_after,
                      after_step=previews.maybe_write)
    return summarize(start, result, step.flops, config.train.peak_flops_per_device)


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
        cpu_allocator.warn_if_missing()
        summary = train(config_flag.value, flags.FLAGS.workdir)
        if jax.process_index() == 0:
            last = summary.losses.get(summary.final_step)
            print(f"done: steps {summary.start_step} → {summary.final_step}, final loss {last}, "
                  f"mean step {summary.mean_step_seconds}, MFU {summary.mfu}, preempted {summary.preempted}"
                  + (f", eval {summary.eval_metrics}" if summary.eval_metrics else ""), flush=True)
        if jax.process_count() > 1:
            jax.distributed.shutdown()

    app.run(run, argv=argv or sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
