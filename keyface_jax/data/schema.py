"""The on-disk contract between dataset preparation (data_pipelines/) and the loaders (keyface_jax/data/).

A prepared dataset is a TFDS dataset (ArrayRecord shards) with **one record per 25 fps video frame**,
so a clip is a handful of random-access reads (14 frames), never a whole video:

  frame record
    video_index  int64             row of the video table
    frame_index  int64             index of this frame in its video, at 25 fps
    latent       [h, w, 4]         diffusion-space latent (VAE sample or mode × 0.18215)
    audio        [2, audio_dim]    the frame's 2 audio tokens (speech ⊕ event features, concatenated)
    valence      float32           per-frame emotion, in [−1, 1]
    arousal      float32
    frame        [H, W, 3] uint8   optional (`store_frames`): the cropped RGB frame, PNG-encoded, for
                                   the keyframe model's pixel losses

Records of one video are contiguous and in frame order. The **video table** (`videos.json` in the
dataset folder, also in the TFDS metadata) lists per video: name, source path, source fps,
num_frames (at 25 fps), first_record (global record index of its frame 0), group (for balancing)
and split. Loaders turn (video, start) choices into record indices with `first_record + frame`.
Each TFDS split holds the frames of the videos whose `split` names it, so `first_record` indexes the
records of that split. `data_pipelines.dataset_writer` writes all of this.

Sources recorded at another rate (the reference's 60 fps NSV sets, spec §6) are resampled by the
preparation, never by the loaders: a video of n source frames has `resampled_length(n, fps)` frames
at 25 fps, and 25 fps frame i is source frame `source_frame_index(i, fps)` = floor(i·fps/25), the
reference's floor(i·2.4) at 60 fps. Audio features are computed at 25 fps from the audio track.
"""

from __future__ import annotations

import dataclasses
import fractions

FPS = 25
AUDIO_RATE = 16_000
SAMPLES_PER_FRAME = AUDIO_RATE // FPS   # 640 audio samples per video frame
TOKENS_PER_FRAME = 2                    # audio tokens per video frame (50 Hz features)
KEYFRAME_STRIDE = 13                    # keyframes are 13 frames apart
CLIP_FRAMES = 14                        # frames per training clip, both stages
VIDEO_TABLE = "videos.json"
# ArrayRecord reads and writes local files only (riegeli's file I/O), so datasets live on a local
# or mounted file system; on a pod, a bucket is mounted with gcsfuse (launch/tpu_pod.sh).
LOCAL_ONLY = ("datasets are read and written with ArrayRecord, which opens local files only: "
              "mount the bucket with gcsfuse (launch/tpu_pod.sh does, at /mnt/<bucket>) and give "
              "the mounted path")


def require_local(path: str, what: str) -> str:
    """`path` unchanged if it is a local path; a URL is an error that says what to do instead."""
    if "://" in str(path):
        raise ValueError(f"{what}={path}: {LOCAL_ONLY}")
    return path


@dataclasses.dataclass(frozen=True)
class VideoEntry:
    name: str            # unique, stable (derived from the source path)
    source: str          # the original video path
    source_fps: float
    num_frames: int      # at 25 fps
    first_record: int    # global index of frame 0 in the frame records
    group: str = "default"
    split: str = "train"


def _rate(source_fps: float) -> fractions.Fraction:
    # exact for 60, 50, 30 and NTSC's 30000/1001, so the floor below never suffers float round-off
    return fractions.Fraction(source_fps).limit_denominator(1001)


def resampled_length(num_source_frames: int, source_fps: float) -> int:
    """Frames at 25 fps of a video of n source frames at `source_fps` (reference: int(n·25/60))."""
    return int(num_source_frames * FPS / _rate(source_fps))


def source_frame_index(frame: int, source_fps: float) -> int:
    """The source frame shown at 25 fps frame `frame`: floor(frame·source_fps/25)."""
    return int(frame * _rate(source_fps) / FPS)
