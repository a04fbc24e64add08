"""Square crop boxes for talking-face clips, and crop + resize.

Two ways to place the box:
- `centre`: the largest centred square of the frame (no detector, no dependency);
- a face detector (`haar`: the frontal-face cascade bundled with opencv-python-headless 4.x, an
  optional dependency (OpenCV 5 moved the cascades to contrib), or any
  object with `__call__(rgb uint8 [H, W, 3]) -> float [k, 4]` boxes (x, y, w, h)): detections
  are taken every few frames, the face is tracked by overlap, gaps are interpolated, and the
  box centre and size are Gaussian-smoothed over time so crops do not jitter.

The crop is `scale` times the face box (KeyFace trains on tight face crops) and is moved, not
padded, to stay inside the frame. Resizing is PIL bilinear with antialiasing, which is what the
reference's torchvision resize(antialias=True) does.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from keyface_jax.media.errors import MediaError

Detector = Callable[[np.ndarray], np.ndarray]


class HaarDetector:
    """OpenCV Haar cascade (bundled with opencv-python-headless) on a downscaled grey frame."""

    def __init__(self, cascade: str = "haarcascade_frontalface_default.xml",
                 max_side: int = 320, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_size_fraction: float = 0.08):
        try:
            import cv2
        except ImportError as e:
            raise ImportError("the 'haar' face detector needs OpenCV: "
                              "pip install opencv-python-headless") from e
        if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved Haar cascades to contrib
            raise ImportError(f"OpenCV {cv2.__version__} has no CascadeClassifier: "
                              "pip install 'opencv-python-headless<5'")
        self._cv2 = cv2
        path = cascade if "/" in cascade else cv2.data.haarcascades + cascade
        self._cascade = cv2.CascadeClassifier(path)
        if self._cascade.empty():
            raise ValueError(f"cannot load Haar cascade {path}")
        self.max_side, self.scale_factor = max_side, scale_factor
        self.min_neighbors, self.min_size_fraction = min_neighbors, min_size_fraction

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        cv2 = self._cv2
        h, w = frame.shape[:2]
        factor = min(1.0, self.max_side / max(h, w))
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if factor < 1.0:
            grey = cv2.resize(grey, (round(w * factor), round(h * factor)),
                              interpolation=cv2.INTER_AREA)
        min_side = max(16, round(self.min_size_fraction * min(grey.shape)))
        boxes = self._cascade.detectMultiScale(grey, scaleFactor=self.scale_factor,
                                               minNeighbors=self.min_neighbors,
                                               minSize=(min_side, min_side))
        return np.asarray(boxes, np.float64).reshape(-1, 4) / factor


def make_detector(name: str) -> Detector | None:
    """'centre' → None (no detector); 'haar' → HaarDetector()."""
    if name in ("centre", "center"):
        return None
    if name == "haar":
        return HaarDetector()
    raise ValueError(f"unknown face detector {name!r}; choose 'centre' or 'haar'")


def centre_box(height: int, width: int) -> np.ndarray:
    """[4] (cx, cy, side): the largest centred square."""
    return np.array([width / 2.0, height / 2.0, float(min(height, width))])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter + 1e-9)


def track_faces(detections: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
    """One (x, y, w, h) face per frame: the largest face first, then the one overlapping the
    last tracked face most (the largest again if none overlaps). None where nothing was found
    or the frame was not run through the detector."""
    tracked, last = [], None
    for boxes in detections:
        if boxes is None or len(boxes) == 0:
            tracked.append(None)
            continue
        boxes = np.asarray(boxes, np.float64)
        pick = int(np.argmax(boxes[:, 2] * boxes[:, 3]))
        if last is not None:
            overlaps = [_iou(b, last) for b in boxes]
            if max(overlaps) > 0.1:
                pick = int(np.argmax(overlaps))
        last = boxes[pick]
        tracked.append(last)
    return tracked


def smooth_boxes(faces: Sequence[np.ndarray | None], height: int, width: int, *,
                 scale: float = 1.6, sigma: float = 5.0, min_face_fraction: float = 0.5,
                 detected_frames: int | None = None) -> np.ndarray:
    """Per-frame faces (x, y, w, h, or None) → square crop boxes [N, 3] (cx, cy, side).

    Missing frames are linearly interpolated (held at the ends); centre and side are Gaussian-
    smoothed with `sigma` frames (0: none; inf: one box for the whole clip, the median). Raises
    MediaError when faces were found in fewer than `min_face_fraction` of the `detected_frames`
    (default: all frames)."""
    n = len(faces)
    found = np.array([f is not None for f in faces])
    checked = detected_frames or n
    if n == 0 or found.sum() < max(1, min_face_fraction * checked):
        raise MediaError(f"no face found in {checked - int(found.sum())} of {checked} "
                         f"checked frames")
    raw = np.zeros((n, 3))
    idx = np.flatnonzero(found)
    for i in idx:
        x, y, w, h = faces[i]
        raw[i] = (x + w / 2.0, y + h / 2.0, scale * max(w, h))
    for c in range(3):
        raw[:, c] = np.interp(np.arange(n), idx, raw[idx, c])
    if np.isinf(sigma):
        raw[:] = np.median(raw, axis=0)
    elif sigma > 0:
        raw = ndimage.gaussian_filter1d(raw, sigma, axis=0, mode="nearest")
    return np.stack([fit_box(b, height, width) for b in raw])


def fit_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """(cx, cy, side) shrunk to the frame's short side and moved inside the frame."""
    cx, cy, side = (float(v) for v in box)
    side = min(side, float(min(height, width)))
    cx = min(max(cx, side / 2.0), width - side / 2.0)
    cy = min(max(cy, side / 2.0), height - side / 2.0)
    return np.array([cx, cy, side])


def crop_resize(frame: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] → the square `box` (cx, cy, side) resized to [size, size, 3]."""
    cx, cy, side = (float(v) for v in box)
    region = (cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)
    image = Image.fromarray(frame)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=region))


def png_bytes(frame: np.ndarray) -> bytes:
    """Lossless PNG of an RGB uint8 frame (deterministic for a given Pillow build)."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="png", compress_level=6)
    return buffer.getvalue()
