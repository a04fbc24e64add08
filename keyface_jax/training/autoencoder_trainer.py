"""Train the autoencoder (SD kl-f8 encoder + SVD temporal decoder) on frames of a folder of videos.

Entered through `python -m keyface_jax.train --config=configs/autoencoder.py:<variant>`; shares
the diffusion trainer's optimizer, mesh / FSDP shardings, update step, loop, checkpoints (resume
is bitwise), preemption handling and metric files.

Clip length: `config.data.clip_frames` (default 1). KeyFace decodes one frame at a time (spec §3:
`decoding_t = 1` in inference and in the pixel loss), so T = 1 trains the decoder exactly as it
is used; the temporal convolutions then see zero padding on both sides and only their centre
taps learn. T > 1 trains them on real neighbours, for pipelines that decode clips.

Every finished run (not a preempted one) ends by writing `workdir/export`: {"autoencoder":
parameter tree} in Orbax, the format `keyface_ckpt.load_orbax_export`,
`weight_sources.frozen_decoder` and `data_pipelines.prepare --vae` read, then scores whole frames
(PSNR of mode latents decoded one frame at a time). Unless
`config.train.normalize_latents` is off, the export's latents are first rescaled to SVD's scale
(std 1 / 0.18215 over the evaluation frames; training/latent_scale.py), reconstructions unchanged.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from keyface_jax.conversion import io
from keyface_jax.config_lib import autoencoder_config
from keyface_jax.data.pipeline import indexed_loader
from keyface_jax.data.video_frames import VideoFrameBatches, evaluation_frames, load_video_frames
from keyface_jax.losses.reconstruction import AutoencoderLossConfig, autoencoder_loss, psnr, to_unit_range
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.training.latent_scale import factor_for, rescale_latents
from keyface_jax.paths import as_path
from keyface_jax.training.loop import (LoopResult, RunSummary, already_done, compile_step,
                                       mesh_from_config, run_loop, summarize)
from keyface_jax.training.metrics import MetricWriter
from keyface_jax.training.optimizer import make_optimizer
from keyface_jax.training.resume import start_or_resume
from keyface_jax.training.trainable import split_network
from keyface_jax.training.step import make_update_step
from keyface_jax.training.weight_sources import WeightSource, autoencoder_state

log = logging.getLogger("keyface_jax.train")

EXPORT_DIR = "export"
TRAIN_EVERYTHING = {"preset": "all"}  # every autoencoder parameter trains


def _videos(config) -> dict[str, np.ndarray]:
    data_cfg = config.data
    if not data_cfg.videos:
        raise ValueError("config.data.videos is empty: give a folder of videos (or a list file)")
    return load_video_frames(data_cfg.videos, fps=data_cfg.fps, frame_stride=data_cfg.frame_stride,
                             max_frames=data_cfg.max_frames_per_video)


def _data(config, videos: dict[str, np.ndarray], mesh, start: int):
    """Global, prefetched batches start, start + 1, … of video frame clips."""
    data_cfg = config.data
    batches = VideoFrameBatches(videos, config.train.batch_size, clip_frames=data_cfg.clip_frames,
                                crop_size=data_cfg.crop_size, flip=data_cfg.flip, seed=config.seed)
    log.info("autoencoder data: %d videos, %d clips of %d frames", len(videos), len(batches.starts),
             data_cfg.clip_frames)
    return indexed_loader(batches, mesh, config.train.batch_size, start=start,
                          prefetch=data_cfg.prefetch, device_prefetch=data_cfg.device_prefetch)


def _initial_params(config, vae_cfg, abstract, shardings):
    """(trainable, frozen) on the mesh: from `config.init.autoencoder` (an Orbax export or an
    autoencoder run), or a
    fresh seeded init run directly on the devices."""
    if config.init.autoencoder:
        source = WeightSource.parse(config.init.autoencoder)
        model = nnx.merge(nnx.split(abstract)[0], autoencoder_state(source, abstract))
        return jax.device_put(tuple(split_network(model, TRAIN_EVERYTHING)[1:]), shardings)

    def create():
        model = AutoencoderKL(vae_cfg, rngs=nnx.Rngs(config.seed))
        return split_network(model, TRAIN_EVERYTHING)[1:]

    return jax.jit(create, out_shardings=shardings)()


def _lpips(config):
    """The LPIPS network of `config.loss` (None when its weight is 0); fails without weight files."""
    loss = config.loss
    if loss.lpips_weight <= 0:
        return None
    if not (loss.lpips_vgg_weights and loss.lpips_lin_weights):
        raise ValueError("config.loss.lpips_weight > 0 needs config.loss.lpips_vgg_weights "
                         "(vgg16-397923af.pth) and config.loss.lpips_lin_weights (LPIPS v0.1 vgg.pth); "
                         "nothing is downloaded")
    from keyface_jax.losses.lpips_import import load_lpips
    return load_lpips(loss.lpips_vgg_weights, loss.lpips_lin_weights,
                      vgg_field="loss.lpips_vgg_weights", lin_field="loss.lpips_lin_weights")


def make_loss_fn(graphdef, loss_cfg: AutoencoderLossConfig, lpips_graphdef=None):
    """loss_fn(params, frozen, batch, key, aux) for `training.step.make_update_step`."""

    def loss_fn(params, frozen, batch, key, aux):
        model = nnx.merge(graphdef, params, frozen)
        lpips = nnx.merge(lpips_graphdef, aux["lpips"]) if "lpips" in aux else None
        return autoencoder_loss(model, batch["frames"], key, loss_cfg, lpips=lpips)

    return loss_fn


def _host_params(state) -> nnx.State:
    """The weights to export (EMA when kept) as one host-side Param State, on every process."""
    tree = (state.weights(), state.frozen)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        tree = multihost_utils.process_allgather(tree, tiled=True)
    else:
        tree = jax.device_get(tree)
    return nnx.merge_state(*tree)


def export_complete(path) -> bool:
    """Whether an export was written to the end (Orbax's metadata file comes last)."""
    return (as_path(path) / "_CHECKPOINT_METADATA").exists()


def write_export(graphdef, state, path, latent_factor: float = 1.0) -> nnx.State:
    """Writes {"autoencoder": parameter tree} (Orbax) to `path`, atomically replacing an older one,
    with the latents rescaled by `latent_factor` (training.latent_scale); returns the exported
    parameters."""
    params = _host_params(state)
    model = nnx.merge(graphdef, params)
    tree = nnx.state(model, nnx.Param).to_pure_dict()
    if latent_factor != 1.0:
        tree = rescale_latents(tree, latent_factor)
    if jax.process_index() == 0:
        io.save_orbax(path, {"autoencoder": tree}, only_this_process=jax.process_count() > 1)
    return nnx.State(tree)


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(graphdef, params, frames):
    model = nnx.merge(graphdef, params)
    x = to_unit_range(frames)
    mean, _ = model.encode(x)
    decoded = model.decode(mean, num_frames=1)  # one frame at a time, as KeyFace decodes
    return psnr(decoded, x), jnp.std(mean)


def evaluate(graphdef, params: nnx.State, frames: np.ndarray, mesh) -> dict[str, float]:
    """PSNR (dB) of whole frames through mode latents, and the std of those latents, for the
    autoencoder's complete parameters `params`."""
    replicated = NamedSharding(mesh, PartitionSpec())
    frames = jax.make_array_from_process_local_data(replicated, frames)
    value, latent_std = _reconstruct(graphdef, params, frames)
    return {"eval_psnr": float(value), "eval_latent_std": float(latent_std)}


def train_autoencoder(config, workdir, *, stop_after: int | None = None) -> RunSummary:
    """Runs (or resumes) autoencoder training to config.train.steps, then exports and evaluates."""
    vae_cfg = autoencoder_config(config.autoencoder)
    mesh = mesh_from_config(config)
    loss_cfg = AutoencoderLossConfig.from_config(config.loss)
    tx, schedule = make_optimizer(config.optim)

    abstract = nnx.eval_shape(lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_trainable, abs_frozen = split_network(abstract, TRAIN_EVERYTHING)
    workdir = as_path(workdir)
    export = workdir / EXPORT_DIR
    initial = functools.partial(_initial_params, config, vae_cfg, abstract)
    run = start_or_resume(config, workdir, abs_trainable, abs_frozen, tx, mesh, initial,
                          what="autoencoder", skip_finished=export_complete(export))
    if run.finished:
        run.checkpoints.close()
        return already_done(run.start)
    videos = _videos(config)

    lpips = _lpips(config)
    aux, lpips_graphdef = {}, None
    if lpips is not None:
        lpips_graphdef, lpips_state = nnx.split(lpips)
        aux["lpips"] = jax.device_put(lpips_state, NamedSharding(mesh, PartitionSpec()))
    step_fn = make_update_step(make_loss_fn(graphdef, loss_cfg, lpips_graphdef), tx, schedule,
                               accum_steps=config.optim.accum_steps, ema_decay=config.optim.ema_decay,
                               nan_policy=config.train.nan_policy)
    if run.start >= int(config.train.steps):   # trained, but the export is missing: write it
        run.checkpoints.close()
        flops, result = None, LoopResult(run.start, {}, False, [], run.state)
    else:
        data = _data(config, videos, mesh, run.start)
        step = compile_step(step_fn, run.state, run.shardings, aux, data, mesh)
        result = run_loop(step, run.state, aux, data, run.checkpoints, config.train, workdir,
                          start=run.start, desc="train autoencoder", stop_after=stop_after)
        flops = step.flops
    if result.final_step < int(config.train.steps):
        # preempted or stopped early: no export of an unfinished model, which a next stage
        # would take for the trained one; re-running resumes and exports at the end
        return summarize(run.start, result, flops, config.train.peak_flops_per_device)

    scores, factor = None, 1.0
    frames = (evaluation_frames(videos, config.train.eval_frames)
              if config.train.eval_frames > 0 else None)
    if frames is not None and config.train.normalize_latents:
        # SVD's latent scale for the diffusion models (training/latent_scale.py)
        trained = nnx.merge_state(result.state.weights(), result.state.frozen)
        trained_std = evaluate(graphdef, trained, frames, mesh)["eval_latent_std"]
        factor = factor_for(trained_std)
        log.info("latent std %.3f → rescaled by %.3f to %.3f (SVD's 1/0.18215)", trained_std, factor,
                 trained_std * factor)
    exported = write_export(graphdef, result.state, export, factor)
    if frames is not None:
        exported = jax.device_put(exported, NamedSharding(mesh, PartitionSpec()))
        scores = evaluate(graphdef, exported, frames, mesh)  # the export itself
        scores["latent_scale_factor"] = factor
        writer = MetricWriter(workdir)
        writer.write(result.final_step, scores)
        writer.close()
        log.info("step %d: %s", result.final_step, scores)
    return summarize(run.start, result, flops, config.train.peak_flops_per_device, eval_metrics=scores)
