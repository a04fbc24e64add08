"""Decoding any audio or video file to the 16 kHz mono float32 waveform the extractors take."""

from __future__ import annotations

import os

import numpy as np

from keyface_jax.data.schema import AUDIO_RATE


def load_audio_16k_mono(path: str, stream_index: int = 0) -> np.ndarray:
    """Decodes the audio stream of `path` (wav, mp3, mp4, mkv, …) to float32 [samples] at 16 kHz.

    The rate is converted by FFmpeg's resampler (through PyAV); channels are then averaged (FFmpeg's
    own mono down-mix sums them at −3 dB, which is louder than any channel and can clip). Raises
    FileNotFoundError for a missing file and ValueError for a file with no audio stream.
    """
    import av  # PyAV: a runtime dependency of the data pipelines, not of the model code

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such audio/video file: {path}")
    with av.open(path) as container:
        streams = container.streams.audio
        if len(streams) <= stream_index:
            raise ValueError(f"{path}: has {len(streams)} audio stream(s), "
                             f"wanted index {stream_index}")
        # planar float, input channel layout kept (layout=None), only the rate changes
        resampler = av.AudioResampler(format="fltp", layout=None, rate=AUDIO_RATE)
        chunks = []
        for frame in container.decode(streams[stream_index]):
            frame.pts = None   # let the resampler run on sample counts, not on container timestamps
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().mean(axis=0))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().mean(axis=0))
    if not chunks:
        return np.zeros(0, np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)
