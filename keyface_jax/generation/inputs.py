"""One generation request and its decoded inputs: the identity frame, the 16 kHz audio, the
per-frame audio features of each stage and the valence/arousal track.

Every problem is raised as `ClipError` naming the file and the reason, so a manifest run can
record it for that clip and go on with the others.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from keyface_jax.audio.base import frames_for_samples
from keyface_jax.data.schema import AUDIO_RATE, SAMPLES_PER_FRAME
from keyface_jax.generation.emotion import emotion_track
from keyface_jax.media import MediaError, face_crop
from keyface_jax.media.audio import peak_dbfs, read_audio
from keyface_jax.media.video import FrameReader
from keyface_jax.paths import as_path, local_copy

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SILENCE_DB = -60.0   # the preparation's threshold: audio peaking below this is "silent"


class ClipError(ValueError):
    """A per-clip input problem (the message names the file)."""


@dataclasses.dataclass
class ClipRequest:
    """What to generate. `emotion`: a state name, "a,b,c" states blended over the clip, a per-frame
    file (.npy/.npz/.json/.csv) or an array [frames, 2]; intensity scales it once."""

    name: str
    face: str                        # image, or video (its first frame)
    audio: str                       # any file with an audio stream (wav, mp3, m4a, mp4, ...)
    output: str                      # the mp4 to write
    emotion: Any = "neutral"
    intensity: float = 1.0
    seed: int = 0
    max_seconds: float | None = None  # generate only the start of the audio
    features: str | None = None       # precomputed features .npy [frames, 2, dim] (both stages)


@dataclasses.dataclass
class ClipInputs:
    request: ClipRequest
    num_frames: int
    waveform: np.ndarray             # float32 16 kHz mono, the part that is generated
    face: np.ndarray                 # uint8 [S, S, 3] identity crop
    keyframe_audio: np.ndarray       # float32 [F, 2, D]
    interpolation_audio: np.ndarray  # float32 [F, 2, D]
    emotions: np.ndarray             # float32 [F, 2] (valence, arousal)


def _first_frame(path: str) -> np.ndarray:
    if path.lower().endswith(IMAGE_SUFFIXES):
        try:
            with Image.open(io.BytesIO(as_path(path).read_bytes())) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise ClipError(f"{path}: cannot read the face image ({e})") from None
    try:
        with local_copy(path) as local:
            for frame in FrameReader(local):
                return frame
    except MediaError as e:
        raise ClipError(f"{path}: cannot read the face video ({e})") from None
    raise ClipError(f"{path}: the face video has no frames")


def load_face(path: str, size: int, detector=None, crop_scale: float = 1.6) -> np.ndarray:
    """uint8 [size, size, 3]: the centred square, or `crop_scale` × the largest detected face."""
    if not as_path(path).is_file():
        raise ClipError(f"{path}: face file not found")
    frame = _first_frame(path)
    height, width = frame.shape[:2]
    if detector is None:
        box = face_crop.centre_box(height, width)
    else:
        faces = np.asarray(detector(frame)).reshape(-1, 4)
        if not len(faces):
            raise ClipError(f"{path}: no face found by the detector")
        x, y, w, h = faces[np.argmax(faces[:, 2] * faces[:, 3])]
        box = face_crop.fit_box(np.array([x + w / 2, y + h / 2, max(w, h) * crop_scale]),
                                height, width)
    return face_crop.crop_resize(frame, box, size)


def load_waveform(path: str, max_seconds: float | None = None) -> np.ndarray:
    """16 kHz mono float32; errors for missing, undecodable, silent or sub-frame audio."""
    if not as_path(path).is_file():
        raise ClipError(f"{path}: audio file not found")
    try:
        with local_copy(path) as local:
            waveform = read_audio(local, AUDIO_RATE).waveform
    except MediaError as e:
        raise ClipError(f"{path}: {e}") from None
    if max_seconds is not None:
        waveform = waveform[:int(round(max_seconds * AUDIO_RATE))]
    if len(waveform) < SAMPLES_PER_FRAME:
        raise ClipError(f"{path}: audio of {len(waveform)} samples is shorter than one video frame "
                        f"({SAMPLES_PER_FRAME} samples at {AUDIO_RATE} Hz)")
    peak = peak_dbfs(waveform)
    if peak < SILENCE_DB:
        raise ClipError(f"{path}: silent audio (peak {peak:.1f} dBFS < {SILENCE_DB:g})")
    return waveform


def _precomputed(path: str, num_frames: int, dim: int) -> np.ndarray:
    try:
        tokens = np.asarray(np.load(io.BytesIO(as_path(path).read_bytes())), np.float32)
    except (OSError, ValueError) as e:
        raise ClipError(f"{path}: cannot read audio features ({e})") from None
    if tokens.ndim != 3 or tokens.shape[1:] != (2, dim):
        raise ClipError(f"{path}: audio features must be [frames, 2, {dim}], got {tokens.shape}")
    if abs(len(tokens) - num_frames) > 2:
        raise ClipError(f"{path}: {len(tokens)} feature frames for {num_frames} audio frames")
    pad = max(0, num_frames - len(tokens))
    return np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)])[:num_frames]


def load_clip(request: ClipRequest, *, image_size: int, audio_dim: int,
              keyframe_features: Callable, interpolation_features: Callable,
              detector=None) -> ClipInputs:
    """Decodes and checks one request. The extractors map (waveform, num_frames) → [F, 2, dim]."""
    waveform = load_waveform(request.audio, request.max_seconds)
    num_frames = frames_for_samples(len(waveform))
    face = load_face(request.face, image_size, detector)
    if request.features:
        kf = ip = _precomputed(request.features, num_frames, audio_dim)
    else:
        kf = keyframe_features(waveform, num_frames)
        ip = kf if interpolation_features is keyframe_features else \
            interpolation_features(waveform, num_frames)
    for name, tokens in (("keyframe", kf), ("interpolation", ip)):
        if tokens.shape != (num_frames, 2, audio_dim):
            raise ClipError(f"{request.audio}: {name} audio features {tokens.shape}, the model needs "
                            f"({num_frames}, 2, {audio_dim})")
    try:
        emotions = emotion_track(request.emotion, num_frames, request.intensity)
    except ValueError as e:
        raise ClipError(f"{request.name}: {e}") from None
    return ClipInputs(request=request, num_frames=num_frames, waveform=waveform, face=face,
                      keyframe_audio=kf, interpolation_audio=ip, emotions=emotions)
