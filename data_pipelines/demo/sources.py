"""Real material that ships inside packages: a face photo and recorded speech.

- Face: `skimage.data.astronaut()` (NASA portrait of Eileen Collins, public domain), with
  hand-placed facial points in its 512×512 pixel coordinates (checked against MediaPipe's mesh:
  inner-lip gap ≈ 7 px, mouth corners ≈ 43 px apart).
- Speech, first found wins (or `--speech` files given by the user):
  1. `pyannote.audio`'s `sample.wav` (30 s, 16 kHz, two speakers, CC-BY; its `sample.rttm` gives
     the speech turns). `pip install --no-deps pyannote.audio` installs just the files; the
     package is located without being imported (its torch dependencies are not needed).
  2. `pysptk`'s `arctic_a0007.wav` (4 s, CMU ARCTIC).
  3. procedural formant babble (`vocal.babble`) when neither is installed.

The recordings' bandwidth is measured (pyannote's sample is telephone speech, nothing above
4 kHz) and the whole soundtrack, laughs and sighs included, goes through the same low-pass, so
non-speech sounds differ from speech in kind, not in channel.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from keyface_jax.data.schema import AUDIO_RATE


@dataclasses.dataclass(frozen=True)
class FaceRig:
    """A face photo and the facial points the animator moves (x, y in image pixels)."""

    image: np.ndarray                   # [H, W, 3] float32 in [0, 255]
    crop_center: tuple[float, float]    # square face crop of side crop_size around this point
    crop_size: float
    mouth_center: tuple[float, float]   # where the lips meet (the split line between the teeth)
    mouth_half_width: float
    chin_y: float
    eyes: tuple[tuple[float, float], ...]  # eye centres
    eye_half_size: tuple[float, float]  # (half width, half height) of the eye opening
    name: str = "face"


def astronaut_rig() -> FaceRig:
    from skimage import data
    return FaceRig(
        image=data.astronaut().astype(np.float32),
        crop_center=(224.0, 128.0), crop_size=176.0,
        mouth_center=(224.0, 147.5), mouth_half_width=21.5, chin_y=179.0,
        eyes=((202.5, 100.5), (245.5, 102.5)), eye_half_size=(10.0, 4.0),
        name="astronaut",
    )


@dataclasses.dataclass(frozen=True)
class SpeechCorpus:
    """16 kHz recordings and their speech intervals (seconds) to cut speech segments from."""

    name: str
    waveforms: tuple[np.ndarray, ...]
    intervals: tuple[tuple[tuple[float, float], ...], ...]   # per waveform: speech spans
    paths: tuple[str, ...]
    bandwidth: float = AUDIO_RATE / 2   # Hz; recordings above this are empty (e.g. telephone)

    def spans(self, min_seconds: float):
        """(waveform index, start, end) of every speech stretch at least `min_seconds` long."""
        out = []
        for i, spans in enumerate(self.intervals):
            out += [(i, a, b) for a, b in spans if b - a >= min_seconds]
        return out


def _package_file(package: str, *parts: str) -> str | None:
    """A data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if spec.origin and not roots:
        roots = [os.path.dirname(spec.origin)]
    for root in roots:
        path = os.path.join(root, *parts)
        if os.path.isfile(path):
            return path
    return None


def _pyannote_sample() -> str | None:
    path = _package_file("pyannote", "audio", "sample", "sample.wav")
    return path


def _pysptk_sample() -> str | None:
    return _package_file("pysptk", "example_audio_data", "arctic_a0007.wav")


def _read_rttm(path: str) -> list[tuple[float, float]]:
    """Union of the speaker turns of an RTTM file, as merged (start, end) seconds."""
    turns = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[0] == "SPEAKER":
                start, dur = float(fields[3]), float(fields[4])
                turns.append((start, start + dur))
    merged: list[list[float]] = []
    for a, b in sorted(turns):
        if merged and a <= merged[-1][1] + 0.15:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def energy_intervals(wav: np.ndarray, rate: int = AUDIO_RATE, floor_db: float = -40.0,
                     gap: float = 0.3) -> list[tuple[float, float]]:
    """Speech spans by frame energy: 20 ms frames within `floor_db` of the file's loud frames."""
    hop = rate // 50
    n = len(wav) // hop
    if n == 0:
        return []
    db = 10 * np.log10(np.mean(wav[:n * hop].reshape(n, hop) ** 2, axis=1) + 1e-12)
    active = db > np.percentile(db, 95) + floor_db * 0.5
    spans, start = [], None
    for i, on in enumerate(np.append(active, False)):
        if on and start is None:
            start = i
        elif not on and start is not None:
            spans.append([start * hop / rate, i * hop / rate])
            start = None
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a - merged[-1][1] < gap:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def estimate_bandwidth(wav: np.ndarray, rate: int = AUDIO_RATE, drop_db: float = 50.0) -> float:
    """Highest frequency whose 250 Hz band is within `drop_db` of the loudest band."""
    n = len(wav) // 1024
    if n == 0:
        return rate / 2
    power = np.mean(np.abs(np.fft.rfft(wav[:n * 1024].reshape(n, 1024) * np.hanning(1024))) ** 2,
                    axis=0)
    bands = power[:512].reshape(32, 16).mean(axis=1)        # 32 bands of 250 Hz
    db = 10 * np.log10(bands + 1e-20)
    alive = np.flatnonzero(db > db.max() - drop_db)
    return float((alive[-1] + 1) * rate / 2 / 32)


def load_speech_corpus(paths: list[str] | None = None) -> SpeechCorpus | None:
    """Recorded speech: the given files, else the package samples; None if there is none."""
    from keyface_jax.audio.io import load_audio_16k_mono

    if paths:
        wavs = tuple(load_audio_16k_mono(p) for p in paths)
        return SpeechCorpus("user", wavs, tuple(tuple(energy_intervals(w)) for w in wavs),
                            tuple(paths), min(estimate_bandwidth(w) for w in wavs))
    path = _pyannote_sample()
    if path:
        wav = load_audio_16k_mono(path)
        rttm = os.path.join(os.path.dirname(path), "sample.rttm")
        spans = _read_rttm(rttm) if os.path.isfile(rttm) else energy_intervals(wav)
        return SpeechCorpus("pyannote_sample", (wav,), (tuple(spans),), (path,),
                            estimate_bandwidth(wav))
    path = _pysptk_sample()
    if path:
        wav = load_audio_16k_mono(path)
        return SpeechCorpus("cmu_arctic_a0007", (wav,), (tuple(energy_intervals(wav)),), (path,),
                            estimate_bandwidth(wav))
    return None
