"""The two-stage long-video pipeline over many clips at once (spec §1.3, bugs of §9 fixed).

  1. identity crops → raw VAE latents (encoder mean);
  2. keyframes: every clip's 14-slot keyframe items (`plan.ClipPlan`) packed into fixed-size
     batches for one jitted 3-branch-guided sampler (keyframes depend on nothing generated, so
     all of them run before any interpolation);
  3. interpolation: every 14-frame segment (between consecutive keyframes) packed the same way,
     sampled with autoguidance and boundaries pinned to the keyframes;
  4. decoding: each segment's 14 latents through the temporal decoder in fixed-size batches, right
     after its interpolation batch, the boundary frame shared by neighbouring segments averaged
     in pixel space, and frames streamed to the clip's mp4 writer.

Static shapes everywhere (items, segments and decode chunks are 14 frames; batches are padded to
their fixed size), so one compilation per stage serves every clip length. Every item and segment
draws its noise from its own key, fold_in(fold_in(key(seed), stage), index within the clip), so a
clip's frames do not depend on what it was batched with. Memory holds the keyframe latents (1 in
13 frames) and one batch of segments, never a whole clip's frames.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import shutil
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from jax.sharding import Mesh
from tqdm.auto import tqdm

from keyface_jax.activation_sharding import activation_sharding
from keyface_jax.data.batch_layout import batch_sharding
from keyface_jax.data.schema import AUDIO_RATE, FPS
from keyface_jax.generation.decoding import decode_jitted
from keyface_jax.generation.inputs import ClipInputs
from keyface_jax.generation.placement import batch_ways, bytes_per_device, generation_mesh, place_weights
from keyface_jax.generation.plan import SLOTS, STRIDE, ClipPlan
from keyface_jax.media.video import VideoWriter
from keyface_jax.models.autoencoder import from_diffusion_space, posterior_mode
from keyface_jax.paths import as_path, is_url, publish, write_bytes
from keyface_jax.sampling import guidance
from keyface_jax.sampling.sampler import sample_interpolation, sample_keyframes
from keyface_jax.sharding import DEFAULT_RULES, Rules

KEYFRAME_STAGE, INTERPOLATION_STAGE = 0, 1


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    keyframe_batch: int = 4           # keyframe items (14 slots each) per sampler call
    interpolation_batch: int = 4      # segments (14 frames each) per sampler call
    decode_batch: int = 2             # segments per decoder call
    # Frames the temporal decoder sees together: 1 decodes frame by frame as KeyFace does
    # (decoding_t = 1) and as autoencoders trained with clip_frames=1 expect; 14 decodes whole
    # segments (for autoencoders trained on clips). Must divide the 14-frame segment.
    decode_frames: int = 1
    num_steps: int = 10               # AYS schedule size (10 → 11 network evaluations)
    audio_scale: float = guidance.KEYFRAME_AUDIO_SCALE
    ref_scale: float = guidance.KEYFRAME_REF_SCALE
    autoguidance_scale: float = guidance.AUTOGUIDANCE_SCALE
    # Keyframes: autoguidance by a weaker keyframe network on top of the 3-branch guider, when
    # one is loaded (`guidance.audio_ref_autoguidance`); KeyFace has none.
    keyframe_autoguidance_scale: float = guidance.AUTOGUIDANCE_SCALE
    # Interpolation guidance: "autoguidance" by the weaker network when one is loaded (else the
    # plain conditional prediction), or "audio_cfg": the main network without audio as the
    # guiding branch, at the same scale (what autoguidance is measured against).
    interpolation_guidance: str = "autoguidance"
    pin_boundaries: bool = True       # see sampling.sampler.pin_endpoints
    crf: int = 18                     # H.264 quality
    save_latents: bool = False        # also write <output>.latents.npy [F, h, w, 4] (memory-mapped)

    def __post_init__(self):
        if self.interpolation_guidance not in ("autoguidance", "audio_cfg"):
            raise ValueError(f"interpolation_guidance={self.interpolation_guidance!r}: choose "
                             "autoguidance or audio_cfg")
        if self.decode_frames < 1 or SLOTS % self.decode_frames:   # fail before any sampling
            raise ValueError(f"decode_frames={self.decode_frames} must divide the {SLOTS}-frame "
                             "segment (1, 2, 7 or 14)")


@dataclasses.dataclass
class Network:
    graphdef: nnx.GraphDef
    state: nnx.State


def clip_key(seed: int, stage: int, index: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stage), index)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Decoder output in [−1, 1] → uint8 RGB."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_mean(graphdef, state, images):
    mean, logvar = nnx.merge(graphdef, state).encode(images.astype(jnp.float32) / 127.5 - 1.0)
    return posterior_mode(mean, logvar)


def _batches(items: Sequence, size: int):
    """Fixed-size batches; the last is padded with copies of its last item (flag False)."""
    for start in range(0, len(items), size):
        chunk = list(items[start:start + size])
        real = [True] * len(chunk) + [False] * (size - len(chunk))
        yield chunk + [chunk[-1]] * (size - len(chunk)), real


class _ClipWriter:
    """Receives a clip's decoded segments in order and streams its frames to an mp4: frame 13·j
    is the average of segment j−1's last and segment j's first decoded frame."""

    def __init__(self, clip: ClipInputs, plan: ClipPlan, path: str, options: GenerationOptions,
                 latent_shape: tuple[int, ...]):
        self.plan, self.path, self.options = plan, path, options
        self.writer = VideoWriter(path, FPS, audio=clip.waveform, audio_rate=AUDIO_RATE,
                                  crf=options.crf)
        self.pending = None     # float pixels of the previous segment's last frame
        self.latents = None
        if options.save_latents:
            self.latents = np.lib.format.open_memmap(path + ".latents.npy", mode="w+",
                                                     dtype=np.float32,
                                                     shape=(plan.num_frames, *latent_shape))

    def add(self, segment: int, pixels: np.ndarray, latents: np.ndarray) -> None:
        # segment −1: a single-frame clip's keyframe chunk, of which only frame 0 is kept
        frames = np.arange(1) if segment < 0 else self.plan.segment_frames(segment)
        local = frames - max(segment, 0) * STRIDE
        chunk = np.asarray(pixels, np.float32)[local]
        if self.pending is not None and len(chunk):
            chunk[0] = 0.5 * (chunk[0] + self.pending)
        self.pending = np.asarray(pixels[-1], np.float32)
        if self.latents is not None:
            self.latents[frames] = latents[local]
        self.writer.write(to_uint8(chunk))

    def close(self) -> int:
        self.writer.close()
        if self.latents is not None:
            self.latents.flush()
            del self.latents
        return self.writer.frames_written


class Generator:
    """Batched long-video generation with fixed networks (see the module docstring)."""

    def __init__(self, keyframe: Network, interpolation: Network, autoencoder,
                 interpolation_bad: Network | None = None,
                 options: GenerationOptions = GenerationOptions(), mesh: Mesh | None = None, *,
                 dtype=None, rules: Rules = DEFAULT_RULES, keyframe_bad: Network | None = None):
        """`mesh` (default: clips over this process's devices) and `rules` lay the networks' weights
        out as in training (FSDP-sharded over an `fsdp` axis) and split each batch over the
        data-parallel axes; `dtype` (e.g. bfloat16) is the weights' storage dtype for sampling
        (the networks' graphdefs carry their compute dtype). The autoencoder stays float32,
        replicated. `keyframe_bad`: a weaker keyframe network to autoguide the keyframes with."""
        self.options = options
        self.mesh = mesh if mesh is not None else generation_mesh("")
        self.rules = rules
        self._batched = batch_sharding(self.mesh)
        ways = batch_ways(self._batched)
        round_up = lambda n: -(-max(int(n), 1) // ways) * ways
        self.sizes = dict(keyframe=round_up(options.keyframe_batch),
                          interpolation=round_up(options.interpolation_batch),
                          decode=round_up(options.decode_batch))
        put = lambda net: None if net is None else Network(
            net.graphdef, place_weights(net.state, self.mesh, dtype=dtype, rules=rules))
        self.keyframe, self.good, self.bad = put(keyframe), put(interpolation), put(interpolation_bad)
        self.keyframe_bad = put(keyframe_bad)
        ae_graphdef, ae_state = nnx.split(autoencoder)
        self.autoencoder = Network(ae_graphdef, place_weights(ae_state, self.mesh, shard=False))
        self.latent_shape = tuple(interpolation.state["learned_mask"].shape)

    def weight_bytes_per_device(self) -> dict[str, int]:
        """Bytes of each network's weights on the most loaded device (what the layout saves)."""
        nets = dict(keyframe=self.keyframe, keyframe_bad=self.keyframe_bad, interpolation=self.good,
                    interpolation_bad=self.bad, autoencoder=self.autoencoder)
        return bytes_per_device({k: n.state for k, n in nets.items() if n is not None})

    def _sampling(self):
        """The activation-sharding context the samplers are traced in (tensor / context axes)."""
        return activation_sharding(self.mesh, self.rules)

    def _put(self, tree):
        return jax.device_put(tree, self._batched)

    def encode_identities(self, clips: Sequence[ClipInputs]) -> list[np.ndarray]:
        """Raw latents [h, w, 4] of each clip's identity crop (one image per call: one shape)."""
        ae = self.autoencoder
        return [np.asarray(_encode_mean(ae.graphdef, ae.state, clip.face[None]))[0] for clip in clips]

    def sample_keyframes(self, clips: Sequence[ClipInputs], identities: Sequence[np.ndarray],
                         progress: bool = True) -> list[np.ndarray]:
        """Diffusion-space keyframe latents [J+1, h, w, 4] per clip."""
        plans = [ClipPlan(c.num_frames) for c in clips]
        out = [np.zeros((len(p.keyframe_positions), *self.latent_shape), np.float32) for p in plans]
        items = [(c, i) for c, p in enumerate(plans) for i in range(p.num_keyframe_items)]
        bar = tqdm(total=len(items), desc="keyframes", unit="item", disable=not progress or None)
        for batch, real in _batches(items, self.sizes["keyframe"]):
            rows = [plans[c].keyframe_item(i) for c, i in batch]
            conditions = dict(
                identity=np.stack([identities[c] for c, _ in batch]),
                audio=np.stack([clips[c].keyframe_audio[r] for (c, _), (r, _) in zip(batch, rows)]),
                valence=np.stack([clips[c].emotions[r, 0] for (c, _), (r, _) in zip(batch, rows)]),
                arousal=np.stack([clips[c].emotions[r, 1] for (c, _), (r, _) in zip(batch, rows)]))
            keys = jnp.stack([clip_key(clips[c].request.seed, KEYFRAME_STAGE, i) for c, i in batch])
            with self._sampling():
                latents = np.asarray(sample_keyframes(
                    self.keyframe.graphdef, self.keyframe.state, self._put(conditions),
                    self._put(keys), num_steps=self.options.num_steps,
                    audio_scale=self.options.audio_scale, ref_scale=self.options.ref_scale,
                    bad_state=None if self.keyframe_bad is None else self.keyframe_bad.state,
                    autoguidance_scale=self.options.keyframe_autoguidance_scale))
            for k, ((c, _), (_, index)) in enumerate(zip(batch, rows)):
                if real[k]:
                    slots = index >= 0
                    out[c][index[slots]] = latents[k][slots]
            bar.update(sum(real))
        bar.close()
        return out

    def interpolate_and_decode(self, clips: Sequence[ClipInputs], keyframes: Sequence[np.ndarray],
                               open_writer: Callable[[int], _ClipWriter],
                               close_writer: Callable[[int, _ClipWriter], None],
                               progress: bool = True) -> None:
        """Samples every segment, decodes and streams frames to writers opened/closed per clip."""
        plans = [ClipPlan(c.num_frames) for c in clips]
        segments = [(c, j) for c, p in enumerate(plans) for j in range(p.num_segments)]
        bar = tqdm(total=len(segments) + sum(p.num_segments == 0 for p in plans),
                   desc="interpolate+decode", unit="segment", disable=not progress or None)
        writers: dict[int, _ClipWriter] = {}
        queue: list[tuple[int, int, np.ndarray]] = []

        def flush(force: bool):
            size = self.sizes["decode"]
            while len(queue) >= size or (force and queue):
                chunk, queue[:] = queue[:size], queue[size:]
                pixels = self._decode_chunks([z for _, _, z in chunk])
                for (c, j, z), image in zip(chunk, pixels):
                    if c not in writers:
                        writers[c] = open_writer(c)
                    writers[c].add(j, image, z)
                    if j == plans[c].num_segments - 1 or j < 0:
                        close_writer(c, writers.pop(c))
                    bar.update()

        for c in range(len(clips)):   # single-frame clips: their keyframe repeated to a chunk
            if plans[c].num_segments == 0:
                queue.append((c, -1, np.repeat(keyframes[c][:1], SLOTS, axis=0)))
        flush(False)
        for batch, real in _batches(segments, self.sizes["interpolation"]):
            first = np.stack([keyframes[c][j] for c, j in batch])
            last = np.stack([keyframes[c][j + 1] for c, j in batch])
            conditions = dict(first=np.asarray(from_diffusion_space(first)),
                              last=np.asarray(from_diffusion_space(last)),
                              audio=np.stack([clips[c].interpolation_audio[plans[c].segment_rows(j)]
                                              for c, j in batch]))
            keys = jnp.stack([clip_key(clips[c].request.seed, INTERPOLATION_STAGE, j) for c, j in batch])
            cfg = self.options.interpolation_guidance == "audio_cfg"
            with self._sampling():
                latents = np.array(sample_interpolation(
                    self.good.graphdef, self.good.state,
                    None if self.bad is None or cfg else self.bad.state,
                    self._put(conditions), self._put(keys), num_steps=self.options.num_steps,
                    scale=self.options.autoguidance_scale,
                    pin_boundaries=self.options.pin_boundaries, audio_cfg=cfg))
            if self.options.pin_boundaries:   # exact keyframes (the sampler saw raw ÷ 0.18215 copies)
                latents[:, 0], latents[:, -1] = first, last
            queue.extend((c, j, z) for (c, j), z, r in zip(batch, latents, real) if r)
            flush(False)
        flush(True)
        bar.close()
        for c, writer in list(writers.items()):   # only reached if a clip had no last segment
            close_writer(c, writer)

    def _decode_chunks(self, chunks: list[np.ndarray]) -> np.ndarray:
        size = self.sizes["decode"]
        z = np.stack(chunks + [chunks[-1]] * (size - len(chunks)))
        ae = self.autoencoder
        return np.asarray(decode_jitted(ae.graphdef, ae.state, self._put(z),
                                        self.options.decode_frames))[:len(chunks)]

    def generate(self, clips: Sequence[ClipInputs], outputs: Sequence[str], *,
                 on_done: Callable[[int, dict], None] | None = None, progress: bool = True) -> list[dict]:
        """Writes each clip's mp4 (local or gs://) whole: under a temporary name, renamed or
        uploaded when complete."""
        plans = [ClipPlan(c.num_frames) for c in clips]
        identities = self.encode_identities(clips)
        keyframes = self.sample_keyframes(clips, identities, progress)
        results: list[dict | None] = [None] * len(clips)
        # Local outputs are written beside their final name and renamed; gs:// ones are written
        # here and uploaded whole when complete.
        scratch = tempfile.mkdtemp(prefix="keyface_generate_")

        def open_writer(c):
            staging = (os.path.join(scratch, f"{c}_{as_path(outputs[c]).name}")
                       if is_url(outputs[c]) else partial_path(outputs[c]))
            as_path(outputs[c]).parent.mkdir(parents=True, exist_ok=True)
            return _ClipWriter(clips[c], plans[c], staging, self.options, self.latent_shape)

        def close_writer(c, writer):
            frames = writer.close()
            if frames != plans[c].num_frames:
                raise RuntimeError(f"{outputs[c]}: wrote {frames} frames, planned {plans[c].num_frames}")
            if self.options.save_latents:
                publish(writer.path + ".latents.npy", outputs[c] + ".latents.npy")
            # the identity crop the models saw (the reference image for drift metrics)
            png = io.BytesIO()
            Image.fromarray(clips[c].face).save(png, format="png")
            write_bytes(identity_path(outputs[c]), png.getvalue())
            publish(writer.path, outputs[c])
            results[c] = dict(name=clips[c].request.name, output=outputs[c], frames=frames,
                              seconds=frames / FPS, keyframes=len(plans[c].keyframe_positions),
                              segments=plans[c].num_segments)
            if on_done is not None:
                on_done(c, results[c])

        try:
            self.interpolate_and_decode(clips, keyframes, open_writer, close_writer, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return results


def identity_path(output: str) -> str:
    return os.path.splitext(output)[0] + ".identity.png"


def partial_path(output: str) -> str:
    """Where a clip is written until it is complete (same folder, so the rename is atomic)."""
    root, ext = os.path.splitext(output)
    return f"{root}.partial{ext or '.mp4'}"
