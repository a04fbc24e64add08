"""A tiny conforming frame dataset whose values encode (video, frame), for tests and benchmarks.

Record of frame f of video v:
  latent[y, x, c] = 1000·v + f + c/4     audio[token, d] = 1000·v + f + token/2
  valence = f/1000, arousal = −v/100     frame pixels = (v, f mod 256, f div 256)
so any loaded field says exactly which record it came from (`decode_latent`).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from data_pipelines.dataset_writer import write_frame_dataset
from keyface_jax.data.schema import FPS, TOKENS_PER_FRAME, VideoEntry


def video_arrays(video: int, num_frames: int, latent_shape: Sequence[int], audio_dim: int,
                 frame_shape: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    f = np.arange(num_frames, dtype=np.float32)
    base = 1000.0 * video + f
    channel = np.arange(latent_shape[-1], dtype=np.float32) / 4
    latent = np.broadcast_to(base[:, None, None, None] + channel, (num_frames, *latent_shape))
    token = np.arange(TOKENS_PER_FRAME, dtype=np.float32)[:, None] / 2
    audio = np.broadcast_to(base[:, None, None] + token, (num_frames, TOKENS_PER_FRAME, audio_dim))
    out = dict(latent=np.ascontiguousarray(latent), audio=np.ascontiguousarray(audio),
               valence=(f / 1000).astype(np.float32),
               arousal=np.full((num_frames,), -video / 100, np.float32))
    if frame_shape is not None:
        fi = np.arange(num_frames)
        rgb = np.stack([np.full_like(fi, video), fi % 256, fi // 256], -1).astype(np.uint8)
        out["frame"] = np.ascontiguousarray(
            np.broadcast_to(rgb[:, None, None, :], (num_frames, *frame_shape)))
    return out


def synthetic_videos(lengths: Sequence[int], *, groups: Sequence[str] | None = None,
                     splits: Sequence[str] | None = None, latent_shape=(4, 4, 4),
                     audio_dim: int = 6, frame_shape=None) -> Iterator[tuple[VideoEntry, dict]]:
    for v, n in enumerate(lengths):
        entry = VideoEntry(name=f"video{v:03d}", source=f"synthetic/video{v:03d}.mp4",
                           source_fps=float(FPS), num_frames=int(n), first_record=0,
                           group=groups[v] if groups else "default",
                           split=splits[v] if splits else "train")
        yield entry, video_arrays(v, int(n), latent_shape, audio_dim, frame_shape)


def write_synthetic_dataset(folder: str, lengths: Sequence[int], *, groups=None, splits=None,
                            latent_shape=(4, 4, 4), audio_dim: int = 6, frame_shape=None,
                            shard_records: int = 256) -> list[VideoEntry]:
    """Writes videos of the given lengths (frames at 25 fps) into `folder`; returns the table."""
    videos = synthetic_videos(lengths, groups=groups, splits=splits, latent_shape=latent_shape,
                              audio_dim=audio_dim, frame_shape=frame_shape)
    return write_frame_dataset(folder, videos, latent_shape=latent_shape,
                               audio_dim=audio_dim, frame_shape=frame_shape,
                               shard_records=shard_records, overwrite=True)


def decode_latent(latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """latent [..., h, w, 4] written by this module → (video, frame) integer arrays [...]."""
    value = np.asarray(latent)[..., 0, 0, 0].astype(np.float64)
    return (value // 1000).astype(np.int64), np.round(value % 1000).astype(np.int64)
