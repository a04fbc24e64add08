"""Small synthetic inputs for generation tests and benchmarks: a face-sized image and speech-like
audio (noise under a syllable-rate envelope), written as real PNG / WAV files."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.io import wavfile


def speechlike(seconds: float, rate: int, seed: int) -> np.ndarray:
    """int16 noise bursts under a 4 Hz syllable envelope (never silent at the start)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = 0.2 + np.clip(np.sin(2 * np.pi * 4 * t + seed), 0, None)
    return (0.4 * envelope * rng.standard_normal(len(t)) * 32767 / 3).astype(np.int16)


def write_speech(path, seconds: float, rate: int = 16000, seed: int = 0) -> str:
    wavfile.write(path, rate, speechlike(seconds, rate, seed))
    return str(path)


def write_face(path, height: int = 150, width: int = 120, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)
