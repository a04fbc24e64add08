"""Per-frame valence/arousal: from files, from a pluggable predictor, or neutral.

`--emotions` takes:
- a folder: `<folder>/<name>.{npz,npy,json,pt}` (or `<folder>/<basename>.*`), holding per-frame
  valence and arousal in [-1, 1] at 25 fps: npz/json/pt with keys `valence`, `arousal` (and an
  optional `fps` when not 25: values are then picked at the 25 fps frame times, sample-and-hold);
  npy as [N, 2]. `.pt` is the reference's format (read without torch). Up to
  `length_tolerance` frames of length mismatch are absorbed (cut, or the last value held).
- `module.path:attr`: a predictor. `attr` is a class (instantiated with no arguments) or a
  callable `predict(frames uint8 [n, S, S, 3]) -> [n, 2] (valence, arousal)`, run on the crops.
- `neutral` (the default): zeros.
"""

from __future__ import annotations

import importlib
import json
import os

import numpy as np

from keyface_jax.data.schema import FPS
from keyface_jax.media.errors import MediaError

_EXTENSIONS = (".npz", ".npy", ".json", ".pt")


class NeutralEmotions:
    name = "neutral"
    predictor = None

    def for_video(self, name: str, path: str, num_frames: int) -> np.ndarray:
        return np.zeros((num_frames, 2), np.float32)


class EmotionFiles:
    predictor = None

    def __init__(self, folder: str, length_tolerance: int = 2):
        self.folder, self.length_tolerance = folder, length_tolerance
        self.name = f"files:{os.path.abspath(folder)}"

    def _find(self, name: str, path: str) -> str:
        stem = os.path.splitext(os.path.basename(path))[0]
        for base in dict.fromkeys((name, stem)):
            for ext in _EXTENSIONS:
                candidate = os.path.join(self.folder, base + ext)
                if os.path.isfile(candidate):
                    return candidate
        raise MediaError(f"no emotion file for {name} in {self.folder}")

    def for_video(self, name: str, path: str, num_frames: int) -> np.ndarray:
        file = self._find(name, path)
        try:
            values, fps = _read(file)
        except (OSError, ValueError, KeyError) as e:
            raise MediaError(f"unreadable emotion file {os.path.basename(file)}: {e}") from None
        if values.ndim != 2 or values.shape[1] != 2 or not np.all(np.isfinite(values)):
            raise MediaError(f"emotion file {os.path.basename(file)}: expected finite [N, 2] "
                             f"values, got {values.shape}")
        if fps and abs(fps - FPS) > 1e-6:  # frame k at 25 fps shows value floor(k * fps / 25)
            count = int(len(values) * FPS / fps + 1e-6)
            values = values[np.minimum((np.arange(count) * fps / FPS + 1e-6).astype(int),
                                       len(values) - 1)]
        if abs(len(values) - num_frames) > self.length_tolerance:
            raise MediaError(f"emotion file has {len(values)} frames, video has {num_frames}")
        if len(values) < num_frames:
            values = np.concatenate([values, np.repeat(values[-1:], num_frames - len(values), 0)])
        return np.asarray(values[:num_frames], np.float32)


def _read(file: str) -> tuple[np.ndarray, float | None]:
    ext = os.path.splitext(file)[1]
    if ext == ".npy":
        return np.load(file), None
    if ext == ".npz":
        with np.load(file) as data:
            fps = float(data["fps"]) if "fps" in data else None
            return np.stack([data["valence"], data["arousal"]], -1).astype(np.float32), fps
    if ext == ".json":
        with open(file, encoding="utf-8") as f:
            return _values(json.load(f))
    from keyface_jax.conversion.torch_pickle import CheckpointError, open_torch_checkpoint
    try:
        with open_torch_checkpoint(file) as data:
            return _values(data)
    except CheckpointError as e:
        raise ValueError(str(e)) from None


def _values(data) -> tuple[np.ndarray, float | None]:
    """{'valence': [N], 'arousal': [N], 'fps'?} (lists, arrays or torch LazyTensors)."""
    pick = lambda v: np.asarray(v.materialize() if hasattr(v, "materialize") else v, np.float32)
    fps = data.get("fps")
    values = np.stack([pick(data["valence"]).reshape(-1), pick(data["arousal"]).reshape(-1)], -1)
    return values, (float(fps) if fps is not None else None)


class EmotionPredictor:
    """Wraps a `predict(frames) -> [n, 2]` callable; values are gathered crop batch by batch."""

    def __init__(self, spec: str):
        module, _, attr = spec.partition(":")
        target = getattr(importlib.import_module(module), attr)
        self.predictor = target() if isinstance(target, type) else target
        self.name = f"predictor:{spec}"

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        out = np.asarray(self.predictor(frames), np.float32)
        if out.shape != (len(frames), 2):
            raise ValueError(f"emotion predictor returned {out.shape} for {len(frames)} frames")
        return out


def make_emotion_source(spec: str | None, length_tolerance: int = 2):
    """See the module docstring. A predictor's values come from `EmotionPredictor.__call__`."""
    if not spec or spec == "neutral":
        return NeutralEmotions()
    if os.path.isdir(spec):
        return EmotionFiles(spec, length_tolerance)
    if ":" in spec and not os.path.exists(spec):
        return EmotionPredictor(spec)
    raise ValueError(f"--emotions {spec!r}: not a folder, 'module:attr' predictor or 'neutral'")
