"""Valence/arousal tracks for generation: a named state, several states blended over the clip,
or per-frame arrays from a file; an intensity factor applied once (the reference applied its
1.5 "accentuate" factor twice, spec §9.4)."""

from __future__ import annotations

import io
import json

import numpy as np

from keyface_jax.paths import as_path

# (valence, arousal) per named state: the reference's table (circumplex-model coordinates).
EMOTIONS = {
    "neutral": (0.0, 0.0), "happy": (0.85, 0.75), "angry": (-0.443, 0.908),
    "surprised": (0.0, 0.85), "sad": (-0.85, -0.35), "fear": (0.181, 0.949),
    "disgusted": (-0.8, 0.5), "contempt": (0.307, 0.535), "calm": (0.65, -0.5),
    "excited": (0.9, 0.9), "bored": (-0.6, -0.9), "confused": (-0.3, 0.4),
    "anxious": (-0.85, 0.9), "confident": (0.7, 0.4), "frustrated": (-0.8, 0.6),
    "amused": (0.7, 0.5), "proud": (0.8, 0.4), "ashamed": (-0.8, -0.3),
    "grateful": (0.7, 0.2), "jealous": (-0.7, 0.5), "hopeful": (0.7, 0.3),
    "disappointed": (-0.7, -0.3), "curious": (0.5, 0.5), "overwhelmed": (-0.6, 0.8),
}
FILE_SUFFIXES = (".npy", ".npz", ".json", ".csv")


def _named(states: list[str], num_frames: int) -> np.ndarray:
    unknown = [s for s in states if s not in EMOTIONS]
    if unknown:
        raise ValueError(f"unknown emotion state(s) {unknown}; known: {sorted(EMOTIONS)}")
    points = np.asarray([EMOTIONS[s] for s in states], np.float64)
    if len(points) == 1:
        return np.repeat(points, num_frames, axis=0)
    # states evenly spaced over the clip, linear in between (first at frame 0, last at the end)
    where = np.linspace(0.0, len(points) - 1, num_frames)
    return np.stack([np.interp(where, np.arange(len(points)), points[:, k]) for k in range(2)], -1)


def _from_file(path: str) -> np.ndarray:
    """[n, 2] valence/arousal: .npy [n, 2], .npz / .json with 'valence' and 'arousal', or .csv
    with those two columns (a header row)."""
    try:
        raw = as_path(path).read_bytes()
        if path.endswith(".npy"):
            return np.asarray(np.load(io.BytesIO(raw)), np.float64)
        if path.endswith(".npz"):
            with np.load(io.BytesIO(raw)) as data:
                return np.stack([data["valence"], data["arousal"]], -1).astype(np.float64)
        if path.endswith(".json"):
            data = json.loads(raw)
            return np.stack([data["valence"], data["arousal"]], -1).astype(np.float64)
        table = np.genfromtxt(io.BytesIO(raw), delimiter=",", names=True)
        return np.stack([table["valence"], table["arousal"]], -1).astype(np.float64)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: cannot read valence/arousal ({type(e).__name__}: {e})") from None


def emotion_track(spec, num_frames: int, intensity: float = 1.0) -> np.ndarray:
    """float32 [num_frames, 2] (valence, arousal) in [−1, 1].

    spec: a state name ("happy"), states joined by "," or "->" ("neutral,happy,sad": blended over
    the clip), a file path (.npy/.npz/.json/.csv, per-frame values; a length off by up to 2 frames
    is padded/cut, more is an error), an array [n, 2], or None (neutral).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        spec = "neutral"
    if isinstance(spec, str) and spec.endswith(FILE_SUFFIXES):
        if not as_path(spec).is_file():
            raise ValueError(f"{spec}: emotion file not found")
        values = _from_file(spec)
    elif isinstance(spec, str):
        values = _named([s.strip() for s in spec.replace("->", ",").split(",") if s.strip()], num_frames)
    else:
        values = np.asarray(spec, np.float64)
    if values.ndim != 2 or values.shape[1] != 2:
        raise ValueError(f"emotion values must be [frames, 2] (valence, arousal), got {values.shape}")
    if abs(len(values) - num_frames) > 2:
        raise ValueError(f"emotion track has {len(values)} frames, the clip {num_frames}")
    values = np.concatenate([values, np.repeat(values[-1:], max(0, num_frames - len(values)), 0)])
    return np.clip(values[:num_frames] * float(intensity), -1.0, 1.0).astype(np.float32)
