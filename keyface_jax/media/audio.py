"""Audio through PyAV: decode, downmix to mono, resample to 16 kHz, align to video frames.

Downmix is the plain mean of the channels (FFmpeg's own stereo→mono matrix scales by 1/√2
instead of 1/2). Resampling is scipy's polyphase filter (zero phase, so an onset stays at the
same time; 44.1 kHz → 16 kHz is up 160 / down 441). AAC pads its last frame to 1024 samples:
callers trim to the video length with `align_to_frames`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import av
import numpy as np
from scipy import signal

from keyface_jax.media.errors import MediaError
from keyface_jax.media.video import _short, open_media


@dataclasses.dataclass(frozen=True)
class Audio:
    waveform: np.ndarray     # float32 [samples], mono, at `rate`
    rate: int
    start_time: float        # time of sample 0 on the container timeline (seconds)
    source_rate: int
    source_channels: int

    @property
    def duration(self) -> float:
        return len(self.waveform) / self.rate


def resample(waveform: np.ndarray, source_rate: int, rate: int) -> np.ndarray:
    """Polyphase resampling of a mono float waveform (identity if the rates agree)."""
    if source_rate == rate:
        return np.asarray(waveform, np.float32)
    g = math.gcd(int(source_rate), int(rate))
    return signal.resample_poly(waveform, rate // g, source_rate // g).astype(np.float32)


def read_audio(path: str | os.PathLike, rate: int = 16_000) -> Audio:
    """The first audio stream of a file as mono float32 at `rate`. Raises MediaError when there
    is no audio stream or it cannot be decoded."""
    with open_media(path) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        # Sample format only: keep the native rate and channels (downmix and resampling are ours).
        to_float = av.AudioResampler(format="fltp")
        chunks, start, source_rate, channels = [], None, None, None
        try:
            for frame in container.decode(stream):
                if start is None:
                    start = frame.time or 0.0
                    source_rate = frame.sample_rate
                for out in to_float.resample(frame):
                    planes = out.to_ndarray()
                    channels = planes.shape[0]
                    chunks.append(planes.mean(axis=0, dtype=np.float32))
            for out in to_float.resample(None):
                chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))
        except (av.FFmpegError, OSError) as e:
            raise MediaError(f"audio decode error: {_short(e)}") from None
        if not chunks or source_rate is None:
            raise MediaError("no decodable audio")
    mono = np.concatenate(chunks)
    return Audio(waveform=resample(mono, source_rate, rate), rate=rate, start_time=float(start),
                 source_rate=int(source_rate), source_channels=int(channels or 1))


def align_to_frames(audio: Audio, video_start: float, num_frames: int, fps: float = 25.0
                    ) -> np.ndarray:
    """The waveform cut to the video: sample 0 at the first video frame's time (zeros before the
    audio starts), exactly num_frames * rate / fps samples (zero-padded past the end)."""
    length = round(num_frames * audio.rate / fps)
    offset = round((audio.start_time - video_start) * audio.rate)
    wave = audio.waveform
    wave = np.concatenate([np.zeros(offset, np.float32), wave]) if offset > 0 else wave[-offset:]
    out = np.zeros(length, np.float32)
    n = min(length, len(wave))
    out[:n] = wave[:n]
    return out


def peak_dbfs(waveform: np.ndarray) -> float:
    """Peak level in dB relative to full scale (-inf for digital silence)."""
    peak = float(np.max(np.abs(waveform))) if len(waveform) else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf
