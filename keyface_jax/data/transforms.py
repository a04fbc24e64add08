"""Which clips to read, and reading them: seeded (video, start) draws and host batches in numpy.

Pure numpy (plus the record reader), so Grain's worker processes import no JAX.

Draw g of a run is a pure function of (seed, g), as in the reference's balanced sampler (spec §4,
§6): a group with probability from `group_weights` (default: equal for every group, the reference's
`balance_datasets`), a video uniformly within the group, then a start uniform in
[min_start, num_frames − span) — the reference's `np.random.randint` bound, which never draws the
last window; `include_last_window=True` allows it. Videos without a window are never drawn.
"""

from __future__ import annotations

import logging
import threading
from typing import Mapping, Sequence

import numpy as np

from keyface_jax.data.schema import CLIP_FRAMES, KEYFRAME_STRIDE, VideoEntry

STRIDES = {"keyframe": KEYFRAME_STRIDE, "interpolation": 1}


def clip_offsets(kind: str, clip_frames: int = CLIP_FRAMES) -> np.ndarray:
    """Frame offsets of a clip from its start: keyframes 0, 13, …, 169; interpolation 0 … 13."""
    if kind not in STRIDES:
        raise ValueError(f"clip kind must be one of {sorted(STRIDES)}, got {kind!r}")
    return np.arange(clip_frames, dtype=np.int64) * STRIDES[kind]


class ClipSampler:
    """Seeded clip draws over the videos of one split.

    Args:
      videos: the whole video table (video_index = position).
      kind: "keyframe" or "interpolation".
      split: only videos of this split are drawn.
      group_weights: None for equal group probabilities, else {group: weight ≥ 0} naming every
        group of the split that has a drawable video (0 excludes a group).
      min_start: first frame a clip may start at, for all groups or per group (the reference starts
        "1000actors_nsv" clips at 120).
      include_last_window: also draw start = num_frames − span.
      seed: the run's data seed.
    """

    def __init__(self, videos: Sequence[VideoEntry], kind: str, *, split: str = "train",
                 group_weights: Mapping[str, float] | None = None,
                 min_start: int | Mapping[str, int] = 0, include_last_window: bool = False,
                 seed: int = 0, clip_frames: int = CLIP_FRAMES):
        self.kind, self.split, self.seed = kind, split, int(seed)
        self.offsets = clip_offsets(kind, clip_frames)
        self.span = int(self.offsets[-1]) + 1
        in_split = [i for i, v in enumerate(videos) if v.split == split]
        if not in_split:
            splits = sorted({v.split for v in videos})
            raise ValueError(f"no video of split {split!r}; splits: {splits}")
        starts = {}  # video index → (lowest, highest + 1) start
        for i in in_split:
            v = videos[i]
            lo = int(min_start.get(v.group, 0) if isinstance(min_start, Mapping) else min_start)
            hi = v.num_frames - self.span + int(include_last_window)
            if hi > lo:
                starts[i] = (lo, hi)
        groups = sorted({videos[i].group for i in in_split})
        drawable = {g: [i for i in sorted(starts) if videos[i].group == g] for g in groups}
        if group_weights is None:
            weights = {g: float(bool(drawable[g])) for g in groups}
        else:
            unknown = sorted(set(group_weights) - set(groups))
            unweighted = sorted(g for g in groups if drawable[g] and g not in group_weights)
            problems = ([f"groups {unknown} are not in split {split!r}"] if unknown else []) + (
                [f"groups {unweighted} have clips but no weight (0 excludes a group)"]
                if unweighted else [])
            if problems:
                raise ValueError(f"group_weights {dict(group_weights)}: " + "; ".join(problems))
            if any(w < 0 for w in group_weights.values()):
                raise ValueError(f"group_weights {dict(group_weights)}: weights must be ≥ 0")
            weights = {g: float(group_weights.get(g, 0.0)) if drawable[g] else 0.0 for g in groups}
            empty = [g for g in groups if group_weights.get(g, 0) > 0 and not drawable[g]]
            if empty:  # one data config serves both stages, whose clip lengths differ
                logging.warning("split %r: groups %s have no video long enough for a %s clip; "
                                "they are not drawn", split, empty, kind)
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"split {split!r}: no video is long enough for a {kind} clip "
                             f"({self.span} frames after min_start) in a group of weight > 0")
        self.groups = tuple(g for g in groups if weights[g] > 0)
        self.group_probs = np.array([weights[g] / total for g in self.groups])
        self._cum = np.cumsum(self.group_probs)
        self._cum[-1] = 1.0
        self._members = [np.asarray(drawable[g], np.int64) for g in self.groups]
        self._starts = starts
        self.first_record = {i: videos[i].first_record for i in starts}

    def video_probs(self) -> dict[int, float]:
        """Probability of drawing each video (index → p), for statistics."""
        return {int(i): float(p / len(members))
                for p, members in zip(self.group_probs, self._members) for i in members}

    def draw(self, index: int) -> tuple[int, int]:
        """(video index, start frame) of draw `index`, a pure function of (seed, index)."""
        rng = np.random.default_rng([self.seed, 0, int(index)])
        group = int(np.searchsorted(self._cum, rng.random(), side="right"))
        group = min(group, len(self.groups) - 1)
        members = self._members[group]
        video = int(members[rng.integers(len(members))])
        lo, hi = self._starts[video]
        return video, int(rng.integers(lo, hi))

    def frames(self, start: int) -> np.ndarray:
        return start + self.offsets


class BatchReader:
    """Host batch j → numpy dict, for Grain's `MapDataset.map`.

    Row k of host batch j is global draw j·global_batch + rows[0] + k, so a global batch holds draws
    [j·B, (j+1)·B) in row order whatever the number of processes, workers or threads.

    Output (b = rows[1] − rows[0], T = clip frames), the names `keyface_jax.diffusion.objective`
    reads: latents [b,T,h,w,4] and audio [b,T,2,D] float32, diffusion-space (× 0.18215) latents
    everywhere; keyframe: identity [b,h,w,4] (= latents[:, 0]), valence/arousal [b,T];
    interpolation: first/last [b,h,w,4] (= latents[:, 0] / latents[:, −1]). Pixel frames, float32
    in [−1, 1] as the reference's `original_frames`: pixel_frames = −1 gives frames [b,T,H,W,3];
    n > 0 gives pixel_frames [b,n,H,W,3] and pixel_frame_index [b,n] int32, n distinct clip frames
    drawn per batch (the same for every clip, as the reference's pixel loss), so only n PNGs per
    clip are decoded. Always: video_index, start, draw_index [b] and frame_index [b,T] int32.
    """

    def __init__(self, folder: str, sampler: ClipSampler, global_batch: int,
                 rows: tuple[int, int], pixel_frames: int = 0):
        t = len(sampler.offsets)
        if not (pixel_frames == -1 or 0 <= pixel_frames <= t):
            raise ValueError(f"pixel_frames must be -1 (all), 0 (none) or 1..{t}, "
                             f"got {pixel_frames}")
        self.folder, self.sampler, self.global_batch = folder, sampler, int(global_batch)
        self.rows, self.pixel_frames = (int(rows[0]), int(rows[1])), int(pixel_frames)
        self._lock = threading.Lock()
        self._source = self._decoder = self._frame_decoder = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_source=None, _decoder=None, _frame_decoder=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _open(self):
        with self._lock:
            if self._source is None:
                from keyface_jax.data import tfds_io
                source = tfds_io.open_frame_source(self.folder, self.sampler.split)
                features = source.dataset_info.features
                fields = ["video_index", "frame_index", "latent", "audio"]
                if self.sampler.kind == "keyframe":
                    fields += ["valence", "arousal"]
                self._decoder = tfds_io.FrameDecoder(features, fields)
                if self.pixel_frames:
                    self._frame_decoder = tfds_io.FrameDecoder(features, ["frame"])
                self._source = source
        return self._source

    def _pixels(self, records) -> np.ndarray:
        frames = np.stack([self._frame_decoder(r)["frame"] for r in records])
        return frames.astype(np.float32) / 127.5 - 1.0

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        source = self._open()
        sampler, t = self.sampler, len(self.sampler.offsets)
        draws = batch_index * self.global_batch + np.arange(*self.rows)
        picks = [sampler.draw(g) for g in draws]
        b = len(picks)
        frames = np.stack([sampler.frames(s) for _, s in picks])
        records = np.stack([sampler.first_record[v] + f for (v, _), f in zip(picks, frames)])
        raw = source.__getitems__(records.reshape(-1).tolist())
        decoded = [self._decoder(r) for r in raw]
        for n, rec in enumerate(decoded):
            want_video, want_frame = picks[n // t][0], frames.flat[n]
            if rec["video_index"] != want_video or rec["frame_index"] != want_frame:
                raise ValueError(
                    f"{self.folder} [{sampler.split}] record {records.flat[n]} is video "
                    f"{int(rec['video_index'])} frame {int(rec['frame_index'])}, the video table "
                    f"says video {want_video} frame {want_frame}: first_record/num_frames do not "
                    "match the records")

        def stack(key):
            values = np.stack([d[key] for d in decoded]).astype(np.float32)
            return values.reshape((b, t) + values.shape[1:])

        latents = stack("latent")
        out = dict(latents=latents, audio=stack("audio"))
        if sampler.kind == "keyframe":
            out.update(identity=latents[:, 0].copy(), valence=stack("valence"),
                       arousal=stack("arousal"))
        else:
            out.update(first=latents[:, 0].copy(), last=latents[:, -1].copy())
        if self.pixel_frames == -1:
            pixels = self._pixels(raw)
            out["frames"] = pixels.reshape((b, t) + pixels.shape[1:])
        elif self.pixel_frames > 0:
            rng = np.random.default_rng([sampler.seed, 1, int(batch_index)])
            index = np.sort(rng.choice(t, self.pixel_frames, replace=False))
            pixels = self._pixels([raw[k * t + i] for k in range(b) for i in index])
            out["pixel_frames"] = pixels.reshape((b, len(index)) + pixels.shape[1:])
            out["pixel_frame_index"] = np.tile(index.astype(np.int32), (b, 1))
        out.update(video_index=np.array([v for v, _ in picks], np.int32),
                   start=np.array([s for _, s in picks], np.int32),
                   draw_index=draws.astype(np.int32), frame_index=frames.astype(np.int32))
        return out
