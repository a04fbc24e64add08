"""LipScore (spec §7.1): cosine similarity of lip-reading features, generated vs ground truth.

Reference (KeyFace `evaluation/lipscore.py` + bundled auto_avsr): for each video, 68 facial
landmarks per frame; missing frames filled by linear interpolation, landmarks smoothed over a
12-frame window; the face similarity-aligned and a 96×96 mouth patch cut around landmarks 48–67;
then /255, centre crop 88×88, grey, normalised with mean 0.421 and std 0.165, and run through
the *encoder* of Auto-AVSR's visual speech recogniser (`vsr_trlrs2lrs3vox2avsp_base_updated.pth`:
3-D conv + ResNet-18 front end, 12-layer Conformer, d = 768) → features [T, 768].
LipScore = per-frame cosine similarity, averaged over frames, then over videos (higher is
better; same T required).

Here:
- landmarks come from dlib's 68-point model (`keyface_jax.eval.faces`; same iBUG numbering as
  the reference's FAN) instead of RetinaFace + FAN, which are not packaged offline;
- alignment is a similarity transform that levels the eye line, scales the inter-ocular
  distance to `INTEROCULAR_PX` and puts the mouth centre in the middle of the 96×96 patch.
  The reference aligns stable points to its "20words" mean face, which is not available here,
  so the patch scale is an approximation of it;
- the encoder is whatever the user supplies (`LipEncoder`): `TorchScriptLipEncoder` loads a
  TorchScript export of Auto-AVSR's encoder. Export it where the auto_avsr code and checkpoint
  are available (github mpc001/auto_avsr; checkpoint `vsr_trlrs2lrs3vox2avsp_base_updated.pth`
  from its model zoo), tracing a module whose forward takes [1, T, 1, 88, 88] float (the
  normalised crops) and returns [1, T, 768] (frontend → proj_encoder → Conformer encoder).
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
from scipy import ndimage

from keyface_jax.eval import faces
from keyface_jax.eval.frechet import require_file

PATCH = 96
CROP = 88
MEAN, STD = 0.421, 0.165
SMOOTH_FRAMES = 12
INTEROCULAR_PX = 68.0   # eye-centre distance in the aligned frame (approximates the mean face)
WHERE = ("export the Auto-AVSR visual encoder (github mpc001/auto_avsr, checkpoint "
         "vsr_trlrs2lrs3vox2avsp_base_updated.pth) to TorchScript with forward "
         "[1, T, 1, 88, 88] → [1, T, 768] and pass its path (see keyface_jax/eval/lipscore.py).")


class LipEncoder(Protocol):
    """Normalised mouth crops [T, 88, 88] float32 → per-frame features [T, D]."""

    def __call__(self, crops: np.ndarray) -> np.ndarray: ...


class TorchScriptLipEncoder:
    """A user-exported TorchScript Auto-AVSR encoder (see the module docstring); needs torch."""

    def __init__(self, path: str | os.PathLike | None, device: str = "cpu"):
        path = require_file(path, "LipScore lip-reading encoder", WHERE)
        try:
            import torch
        except ImportError as e:
            raise ImportError("the LipScore encoder is a TorchScript file: install torch") from e
        self._torch, self.device = torch, device
        self.model = torch.jit.load(path, map_location=device).eval()

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(crops, np.float32))[None, :, None]
        with torch.no_grad():
            y = self.model(x.to(self.device))
        return y[0].cpu().numpy().astype(np.float64)


def smooth_landmarks(points: np.ndarray, window: int = SMOOTH_FRAMES) -> np.ndarray:
    """[T, 68, 2] with NaN frames → gaps interpolated per coordinate, then a centred moving
    average over `window` frames (shorter at the ends). ValueError if no frame has a face."""
    pts = np.asarray(points, np.float64)
    flat = pts.reshape(len(pts), -1)
    if not np.isfinite(flat).all(axis=1).any():
        raise ValueError("no face landmarks in any frame")
    filled = np.stack([faces.fill_gaps(flat[:, j]) for j in range(flat.shape[1])], 1)
    if window > 1:
        filled = ndimage.uniform_filter1d(filled, window, axis=0, mode="nearest")
    return filled.reshape(pts.shape)


def mouth_transform(points: np.ndarray, interocular_px: float = INTEROCULAR_PX,
                    patch: int = PATCH) -> np.ndarray:
    """[2, 3] affine (frame → patch): eye line level, eye distance `interocular_px`, mouth
    centre (mean of 48–67) at the patch centre."""
    left, right = points[faces.LEFT_EYE].mean(0), points[faces.RIGHT_EYE].mean(0)
    d = right - left
    angle = np.arctan2(d[1], d[0])
    scale = interocular_px / max(np.hypot(*d), 1e-6)
    c, s = np.cos(-angle) * scale, np.sin(-angle) * scale
    rot = np.array([[c, -s], [s, c]])
    mouth = points[faces.MOUTH].mean(0)
    shift = np.array([patch / 2.0, patch / 2.0]) - rot @ mouth
    return np.concatenate([rot, shift[:, None]], 1)


def mouth_crops(frames: np.ndarray, points: np.ndarray) -> np.ndarray:
    """RGB uint8 frames [T, H, W, 3] and smoothed landmarks [T, 68, 2] → encoder input
    [T, 88, 88] float32 (96×96 patch, centre crop 88, grey, normalised)."""
    import cv2

    out = np.empty((len(frames), CROP, CROP), np.float32)
    lo = (PATCH - CROP) // 2
    for i, (frame, pts) in enumerate(zip(frames, points)):
        patch = cv2.warpAffine(np.ascontiguousarray(frame), mouth_transform(pts), (PATCH, PATCH),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        patch = patch[lo:lo + CROP, lo:lo + CROP].astype(np.float32) / 255.0
        grey = patch @ np.array([0.299, 0.587, 0.114], np.float32)
        out[i] = (grey - MEAN) / STD
    return out


def video_crops(frames: np.ndarray, models: faces.FaceModels | None = None) -> np.ndarray:
    """Landmarks (dlib), smoothing and mouth crops for one video [T, H, W, 3] uint8."""
    models = models or faces.FaceModels()
    track = faces.track_face(frames, models)
    return mouth_crops(frames, smooth_landmarks(track.points))


def framewise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[T] cosine similarity of matching rows of two [T, D] feature arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [T, D] arrays of one shape, got {a.shape} and {b.shape}")
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return num / np.maximum(den, 1e-12)


def lip_score(generated: list[np.ndarray], reference: list[np.ndarray], encoder: LipEncoder,
              models: faces.FaceModels | None = None) -> dict:
    """LipScore over pairs of videos [T, H, W, 3] uint8 (same T per pair): per-frame cosine
    similarity of encoder features, mean over frames, then over videos."""
    if len(generated) != len(reference) or not generated:
        raise ValueError("need equally many (≥ 1) generated and reference videos")
    models = models or faces.FaceModels()
    per_video = []
    for gen, ref in zip(generated, reference):
        if len(gen) != len(ref):
            raise ValueError(f"frame counts differ: {len(gen)} vs {len(ref)}")
        fg = encoder(video_crops(gen, models))
        fr = encoder(video_crops(ref, models))
        per_video.append(float(framewise_cosine(fg, fr).mean()))
    return dict(lip_score=float(np.mean(per_video)), per_video=per_video)
