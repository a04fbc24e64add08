"""Autoencoder training batches: clips of consecutive frames straight from a folder of videos.

Frames are decoded once (25 fps, uint8) and kept in memory: the autoencoder needs no latents,
audio or emotions, so there is no dataset to prepare first. For long corpora, `frame_stride`
and `max_frames_per_video` bound the memory.

Batch j is a pure function of (seed, j): which clips, where they are cropped, whether they are
flipped. So a resumed run (or one on another number of processes) sees exactly the batches an
uninterrupted one would (`data.pipeline.indexed_loader` serves them from batch `start`).
"""

from __future__ import annotations

import logging

import numpy as np

from keyface_jax.data.schema import require_local
from keyface_jax.media.errors import MediaError
from keyface_jax.media.video import read_frames
from keyface_jax.media.video_list import list_videos

log = logging.getLogger(__name__)


def load_video_frames(videos: str, *, fps: float = 25.0, frame_stride: int = 1,
                      max_frames: int = 0) -> dict[str, np.ndarray]:
    """{video name: uint8 frames [N, H, W, 3]} of every readable video under `videos` (a folder or
    a list file, as `data_pipelines.prepare --videos`), sorted by name. Unreadable files are
    skipped with a warning; finding no frames at all is an error."""
    out = {}
    for item in list_videos(require_local(videos, "config.data.videos")):
        try:
            frames, _ = read_frames(item.path, fps)
        except MediaError as e:
            log.warning("skipping %s: %s", item.path, e)
            continue
        frames = frames[::max(int(frame_stride), 1)]
        out[item.name] = frames[:max_frames] if max_frames > 0 else frames
    if not any(len(f) for f in out.values()):
        raise ValueError(f"config.data.videos={videos!r}: no readable video frames")
    return out


class VideoFrameBatches:
    """Global batches {"frames": uint8 [B, T, S, S, 3]}: T consecutive frames of
    one video, the same random S×S crop and flip for the whole clip (crop_size 0 = full frames,
    which then must all have one size)."""

    def __init__(self, videos: dict[str, np.ndarray], global_batch: int, *, clip_frames: int = 1,
                 crop_size: int = 0, flip: bool = False, seed: int = 0):
        self.videos = [v for v in videos.values() if len(v) >= clip_frames]
        if not self.videos:
            raise ValueError(f"no video has {clip_frames} frames for a clip")
        sizes = {v.shape[1:3] for v in self.videos}
        smallest = min(min(s) for s in sizes)
        if crop_size > smallest:
            raise ValueError(f"config.data.crop_size={crop_size} exceeds the smallest frame side "
                             f"{smallest}")
        if not crop_size and len(sizes) > 1:
            raise ValueError(f"videos have several frame sizes {sorted(sizes)}: set "
                             "config.data.crop_size")
        # Every clip start (video, first frame), so each clip is equally likely.
        self.starts = np.array([(v, s) for v, frames in enumerate(self.videos)
                                for s in range(len(frames) - clip_frames + 1)], np.int64)
        self.global_batch, self.seed, self.clip_frames = global_batch, seed, clip_frames
        self.crop_size, self.flip = crop_size, flip

    def _clip(self, rng: np.random.Generator) -> np.ndarray:
        video, start = self.starts[rng.integers(len(self.starts))]
        clip = self.videos[video][start:start + self.clip_frames]
        if self.crop_size:
            h, w = clip.shape[1:3]
            y, x = rng.integers(h - self.crop_size + 1), rng.integers(w - self.crop_size + 1)
            clip = clip[:, y:y + self.crop_size, x:x + self.crop_size]
        if self.flip and rng.random() < 0.5:
            clip = clip[:, :, ::-1]
        return clip

    def global_batch_at(self, j: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, j])
        return {"frames": np.stack([self._clip(rng) for _ in range(self.global_batch)])}


def evaluation_frames(videos: dict[str, np.ndarray], count: int) -> np.ndarray:
    """`count` whole frames spread evenly over all videos (uint8 [count, H, W, 3]) for scoring
    reconstructions; frames of the most common size only."""
    sizes = [v.shape[1:3] for v in videos.values() if len(v)]
    common = max(set(sizes), key=sizes.count)
    pool = [v for v in videos.values() if len(v) and v.shape[1:3] == common]
    ends = np.cumsum([len(v) for v in pool])
    picks = np.linspace(0, ends[-1] - 1, min(count, int(ends[-1]))).round().astype(int)
    video = np.searchsorted(ends, picks, side="right")  # no copy of the whole corpus
    first = np.concatenate([[0], ends[:-1]])
    return np.stack([pool[v][i - first[v]] for v, i in zip(video, picks)])
