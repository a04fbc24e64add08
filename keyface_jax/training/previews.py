"""Preview samples written as mp4 while a diffusion network trains (`config.train.preview_every`).

Every `preview_every` steps and at the last step, the current weights (the EMA copy when the run
keeps one) sample a fixed preview batch with the linear-CFG preview guider
(`sampler.sample_preview`), and WORKDIR/previews/step_XXXXXX.mp4 shows, per clip (one row each),
the ground truth on the left and the sample on the right.

- Fixed inputs: the first clips of the run's first global batch, saved as previews/batch.npz so a
  resumed run previews the same clips. The noise has its own key (from config.seed), never the
  training PRNG stream, and nothing here touches the train state or the data iterator: previews
  leave the loss trajectory bitwise unchanged.
- Pictures: latents decoded by the frozen VAE decoder of `config.init.autoencoder` (the pixel
  losses' decoder); with none configured, latent channels 0-2 shown as RGB, upsampled.
- Every process runs the sampling (one SPMD program over the sharded weights, compiled once);
  process 0 writes the file.
"""

from __future__ import annotations

import io
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from keyface_jax.data.batch_layout import to_global
from keyface_jax.data.schema import KEYFRAME_STRIDE
from keyface_jax.media.video import write_video
from keyface_jax.models.autoencoder import from_diffusion_space
from keyface_jax.paths import as_path, staged_output, write_bytes
from keyface_jax.sampling import sampler
from keyface_jax.training import weight_sources

log = logging.getLogger("keyface_jax.train")

PREVIEW_CLIPS = 2
# fold_in constant of the preview noise key: a stream of its own, apart from the training key.
NOISE_STREAM = 0x70726576
BATCH_FILE = "batch.npz"
# Batch fields the preview needs (pixel-loss frames and the like are left out of batch.npz).
PREVIEW_FIELDS = ("latents", "audio", "identity", "valence", "arousal", "first", "last")
VIDEO_FPS = 25.0


def preview_conditions(batch, kind: str) -> dict:
    """The sampler's conditions from a diffusion-space batch, built as the trainer builds the
    network's (`objective.network_conditions`): condition latents raw (÷ 0.18215), no dropout."""
    latents = batch["latents"]
    if kind == "keyframe":
        identity = batch["identity"] if "identity" in batch else latents[:, 0]
        return dict(identity=from_diffusion_space(identity), audio=batch["audio"],
                    valence=batch["valence"], arousal=batch["arousal"])
    first = batch["first"] if "first" in batch else latents[:, 0]
    last = batch["last"] if "last" in batch else latents[:, -1]
    return dict(first=from_diffusion_space(first), last=from_diffusion_space(last),
                audio=batch["audio"])


def latent_pictures(latents: np.ndarray, reference: np.ndarray, scale: int) -> np.ndarray:
    """Latents [B, T, h, w, C] → uint8 [B, T, h·scale, w·scale, 3]: channels 0-2 as RGB, each
    mapped from the reference's mean ± 2.5 std onto [0, 255], so that ground truth and samples
    share one colour scale."""
    ref = np.asarray(reference, np.float32)[..., :3]
    mean, std = ref.mean(axis=(0, 1, 2, 3)), ref.std(axis=(0, 1, 2, 3)) + 1e-6
    rgb = np.clip((np.asarray(latents, np.float32)[..., :3] - mean) / (5 * std) + 0.5, 0.0, 1.0)
    rgb = rgb.repeat(scale, axis=2).repeat(scale, axis=3)
    return np.round(rgb * 255).astype(np.uint8)


def side_by_side(truth: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """[B, T, H, W, 3] ground truth and samples → video frames [T, B·H, 2·W, 3]: one row per
    clip, the ground truth on the left."""
    pairs = np.concatenate([truth, sample], axis=3)
    b, t, h, w, c = pairs.shape
    return pairs.transpose(1, 0, 2, 3, 4).reshape(t, b * h, w, c)


def _host(x) -> np.ndarray:
    """A replicated global array's value on this process (works on every process)."""
    return np.asarray(x.addressable_data(0))


def _load_matching(path, like: dict) -> dict | None:
    """The saved preview batch if it has the same fields and shapes as `like` (a resumed run of
    the same config), else None."""
    if not path.exists():
        return None
    with np.load(io.BytesIO(path.read_bytes())) as saved:
        batch = {k: saved[k] for k in saved.files}
    same = sorted(batch) == sorted(like) and all(batch[k].shape == like[k].shape for k in like)
    return batch if same else None


class PreviewWriter:
    """Writes the preview videos of a run; `maybe_write(step, state)` after every step."""

    def __init__(self, config, workdir, graphdef, first_batch: dict, mesh, dtype=None, *,
                 clips: int = PREVIEW_CLIPS):
        self.every = int(config.train.get("preview_every", 0) or 0)
        self.total = int(config.train.steps)
        if self.every <= 0:
            return
        self.folder = as_path(workdir) / "previews"
        self.kind = config.model.kind
        # Keyframe clips sample every 13th frame of 25 fps video: play them at their real pace.
        self.fps = VIDEO_FPS / KEYFRAME_STRIDE if self.kind == "keyframe" else VIDEO_FPS
        self._replicated = NamedSharding(mesh, PartitionSpec())
        batch = self._fixed_batch(first_batch, clips)
        place = lambda tree: to_global(tree, self._replicated)
        self._conditions = place(preview_conditions(batch, self.kind))
        self._truth_latents = place({"z": batch["latents"]})["z"]
        key = jax.random.fold_in(jax.random.key(config.seed), NOISE_STREAM)
        n = batch["latents"].shape[0]
        self._key_data = place({"k": np.asarray(jax.random.key_data(jax.random.split(key, n)))})["k"]
        self._sample = jax.jit(self._sampling_fn(graphdef), out_shardings=self._replicated)
        self._decoder = self._load_decoder(config, dtype)
        self._upscale = max(1, int(config.autoencoder.image_size) // batch["latents"].shape[-2])
        self._truth_pictures = None  # made at the first preview

    def _fixed_batch(self, first_batch: dict, clips: int) -> dict:
        """The first `clips` clips of the global batch on every host, or, on resume, the clips
        the run previewed before (process 0's batch.npz, broadcast to every process)."""
        fields = {k: v for k, v in first_batch.items() if k in PREVIEW_FIELDS}
        take = jax.jit(lambda b: {k: v[:clips] for k, v in b.items()}, out_shardings=self._replicated)
        batch = {k: _host(v) for k, v in take(fields).items()}
        if jax.process_index() == 0:
            path = self.folder / BATCH_FILE
            saved = _load_matching(path, batch)
            if saved is None:
                buffer = io.BytesIO()
                np.savez(buffer, **batch)
                write_bytes(path, buffer.getvalue())
            else:
                batch = saved
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            batch = {k: np.asarray(v) for k, v in multihost_utils.broadcast_one_to_all(batch).items()}
        return batch

    @staticmethod
    def _sampling_fn(graphdef):
        def sample(weights, frozen, conditions, key_data):
            state = nnx.merge_state(weights, frozen)
            keys = jax.random.wrap_key_data(key_data)
            return sampler.sample_preview(graphdef, state, conditions, keys)
        return sample

    def _load_decoder(self, config, dtype):
        """(jitted decode, decoder state) from config.init.autoencoder, or None (latent previews)."""
        if not config.init.get("autoencoder", ""):
            log.info("previews: config.init.autoencoder is not set, so the previews show latent "
                     "channels 0-2 as RGB instead of decoded frames")
            return None
        decoder = weight_sources.frozen_decoder(config.init, config.autoencoder, dtype)
        graphdef, state = nnx.split(decoder)
        state = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            self._replicated, np.asarray(x)), state)

        def decode(state, z):
            net = nnx.merge(graphdef, state)
            # One clip at a time bounds the activation memory; each frame decoded on its own, as
            # KeyFace decodes (decoding_t = 1) and the autoencoder trainer trains by default.
            frames = jax.lax.map(lambda clip: net(from_diffusion_space(clip), num_frames=1), z)
            frames = jnp.clip(frames.astype(jnp.float32), -1.0, 1.0)
            return jnp.round((frames + 1.0) * 127.5).astype(jnp.uint8)

        return jax.jit(decode, out_shardings=self._replicated), state

    def _pictures(self, z) -> np.ndarray:
        """Replicated latents [B, T, h, w, C] → uint8 pictures [B, T, H, W, 3] on the host."""
        if self._decoder is not None:
            decode, state = self._decoder
            return _host(decode(state, z))
        return latent_pictures(_host(z), _host(self._truth_latents), self._upscale)

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.total)

    def maybe_write(self, step: int, state) -> float:
        """Writes the preview of `step` if one is due; returns the seconds it took (0 if none),
        which the training loop keeps out of its step times. Call on every process."""
        if not self.due(step):
            return 0.0
        start = time.perf_counter()
        sample = self._sample(state.weights(), state.frozen, self._conditions, self._key_data)
        if self._truth_pictures is None:
            self._truth_pictures = self._pictures(self._truth_latents)
        video = side_by_side(self._truth_pictures, self._pictures(sample))
        if jax.process_index() == 0:
            path = self.folder / f"step_{step:06d}.mp4"
            with staged_output(path) as local:
                write_video(local, video, self.fps)
            log.info("preview of step %d: %s (%.2f s)", step, path, time.perf_counter() - start)
        return time.perf_counter() - start
