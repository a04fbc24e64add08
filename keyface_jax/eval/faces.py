"""Faces in evaluated videos: dlib's detector, 68 landmarks and 128-d face descriptor, all offline.

The model files ship inside PyPI packages (nothing is downloaded at run time):
- `dlib-bin` (prebuilt dlib 20): the HOG frontal-face detector (no file needed);
- `face-recognition-models` 0.3.0: `shape_predictor_68_face_landmarks.dat` (iBUG 300-W
  annotation, 0-based: 36–41 / 42–47 eyes, 48–59 outer lips, 60–67 inner lips) and
  `dlib_face_recognition_resnet_model_v1.dat` (a ResNet giving a 128-d descriptor; dlib's
  same-person rule is Euclidean distance < 0.6). Licence caveat: the 68-point model was trained
  on iBUG 300-W, whose terms exclude commercial use.

`face_recognition_models/__init__.py` imports `pkg_resources`, gone from recent setuptools, so the
files are located through the import system without importing the package.

`FaceTracker` runs the detector on the first frame and every `detect_every` frames after it; in
between, the box follows the landmarks (box centre = landmark centroid + the offset measured at
the last detection), so a moving head is tracked without a detection per frame. A failed
detection keeps the tracked box for at most `max_track` frames; after that the frame has no
landmarks (NaN), and callers interpolate over such frames, unless a `fallback_box` is given:
then such frames are measured inside it (a generated video keeps its identity crop's framing,
so the identity image's face box is where its face is meant to be; the count is reported).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterable

import numpy as np

LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"
INSTALL_HINT = "pip install dlib-bin face-recognition-models"

LEFT_EYE = slice(36, 42)
RIGHT_EYE = slice(42, 48)
# inner-lip pairs (upper, lower) in 0-based iBUG numbering: 61–67, 62–66, 63–65
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))
MOUTH = slice(48, 68)


def model_dir() -> str:
    """The folder of face-recognition-models' .dat files; ImportError with the install line if
    the package is missing."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        folder = os.path.join(location, "models")
        if os.path.isfile(os.path.join(folder, LANDMARKS_FILE)):
            return folder
    raise ImportError(f"the face-landmark models are missing: {INSTALL_HINT}")


def _dlib():
    try:
        import dlib
    except ImportError as e:
        raise ImportError(f"face analysis needs dlib: {INSTALL_HINT}") from e
    return dlib


class FaceModels:
    """dlib's HOG detector, 68-point shape predictor and face-descriptor ResNet, loaded once."""

    def __init__(self, folder: str | None = None):
        dlib = _dlib()
        folder = folder or model_dir()
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(os.path.join(folder, LANDMARKS_FILE))
        self._descriptor_path = os.path.join(folder, DESCRIPTOR_FILE)
        self._descriptor = None

    @property
    def descriptor(self):
        if self._descriptor is None:   # 22 MB ResNet: loaded only when identity is measured
            self._descriptor = self.dlib.face_recognition_model_v1(self._descriptor_path)
        return self._descriptor

    def detect(self, image: np.ndarray) -> np.ndarray:
        """Faces as [k, 4] boxes (left, top, right, bottom), largest first. Small frames are
        upsampled once (the HOG detector misses faces under about 80 px)."""
        image = np.ascontiguousarray(image)
        found = self.detector(image, 0)
        if len(found) == 0 and min(image.shape[:2]) < 640:
            found = self.detector(image, 1)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in found],
                         np.float64).reshape(-1, 4)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[np.argsort(-area)]

    def shape(self, image: np.ndarray, box: np.ndarray):
        """dlib full_object_detection of the 68 landmarks inside `box`."""
        rect = self.dlib.rectangle(*(int(round(v)) for v in box))
        return self.predictor(np.ascontiguousarray(image), rect)

    def chip(self, image: np.ndarray, shape, size: int = 150, padding: float = 0.25
             ) -> np.ndarray:
        """The face rotated upright and scaled to [size, size, 3] (dlib's alignment)."""
        return self.dlib.get_face_chip(np.ascontiguousarray(image), shape, size, padding)

    def embed_chip(self, chip: np.ndarray) -> np.ndarray:
        """The 128-d descriptor of a 150×150 chip from `chip`."""
        return np.asarray(self.descriptor.compute_face_descriptor(np.ascontiguousarray(chip)),
                          np.float64)


def shape_points(shape) -> np.ndarray:
    return np.array([(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)],
                    np.float64)


def interocular(points: np.ndarray) -> float:
    """Distance between the two eye centres (face size that does not move with the jaw)."""
    return float(np.linalg.norm(points[LEFT_EYE].mean(0) - points[RIGHT_EYE].mean(0)))


def mouth_opening(points: np.ndarray) -> float:
    """Mean inner-lip gap over the three upper/lower pairs, in inter-ocular distances."""
    gaps = [np.linalg.norm(points[a] - points[b]) for a, b in INNER_LIP_PAIRS]
    return float(np.mean(gaps) / max(interocular(points), 1e-6))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return w * h / (area(a) + area(b) - w * h + 1e-9)


class FaceTracker:
    """Per-frame 68 landmarks of one face (see the module docstring for the tracking rule)."""

    def __init__(self, models: FaceModels, detect_every: int = 5, max_track: int = 25,
                 fallback_box: np.ndarray | None = None):
        if detect_every < 1 or max_track < 0:
            raise ValueError("need detect_every >= 1 and max_track >= 0")
        self.models = models
        self.fallback_box = None if fallback_box is None else np.asarray(fallback_box, np.float64)
        self.fallback = 0          # frames measured inside the fallback box
        self.detect_every, self.max_track = int(detect_every), int(max_track)
        self.box = None            # (l, t, r, b) used for the next frame
        self.offset = np.zeros(2)  # detection box centre minus landmark centroid
        self.since_detection = 0
        self.index = 0
        self.detections = 0
        self.held = 0              # frames given landmarks from a held box after a failed detection

    def _pick(self, boxes: np.ndarray) -> np.ndarray:
        if self.box is not None:
            overlaps = [_iou(b, self.box) for b in boxes]
            if max(overlaps) > 0.1:
                return boxes[int(np.argmax(overlaps))]
        return boxes[0]

    def __call__(self, frame: np.ndarray):
        """(points [68, 2] or None, dlib shape or None, whether a detection ran and found one)."""
        due = self.index % self.detect_every == 0 or self.since_detection > 0 or self.box is None
        self.index += 1
        detected = False
        if due:
            boxes = self.models.detect(frame)
            if len(boxes):
                self.box = self._pick(boxes)
                self.since_detection, detected = 0, True
                self.detections += 1
            else:
                self.since_detection += 1
                if self.since_detection > self.max_track:
                    self.box = None
        if self.box is None:
            if self.fallback_box is None:
                return None, None, False
            self.fallback += 1
            shape = self.models.shape(frame, self.fallback_box)
            return shape_points(shape), shape, False
        if self.since_detection > 0:
            self.held += 1
        shape = self.models.shape(frame, self.box)
        points = shape_points(shape)
        centre = points.mean(0)
        half = (self.box[2:] - self.box[:2]) / 2.0
        if detected:
            self.offset = (self.box[:2] + half) - centre
        else:
            c = centre + self.offset
            self.box = np.concatenate([c - half, c + half])
        return points, shape, detected


@dataclasses.dataclass
class FaceTrack:
    """Per-frame landmark results of a whole video."""

    points: np.ndarray        # [N, 68, 2] float, NaN where no face
    found: np.ndarray         # [N] bool: landmarks present (detected or tracked)
    detections: int           # number of successful detector runs
    held: int = 0             # frames whose landmarks used a held box after a failed detection
    fallback: int = 0         # frames measured inside the fallback box (no face tracked)

    @property
    def num_frames(self) -> int:
        return len(self.found)

    def openings(self) -> np.ndarray:
        """[N] mouth opening (inner-lip gap / inter-ocular distance), NaN where no face."""
        out = np.full(self.num_frames, np.nan)
        for i in np.flatnonzero(self.found):
            out[i] = mouth_opening(self.points[i])
        return out


def track_face(frames: Iterable[np.ndarray], models: FaceModels, detect_every: int = 5,
               max_track: int = 25, on_frame=None, fallback_box: np.ndarray | None = None
               ) -> FaceTrack:
    """Landmarks for every frame; `on_frame(index, frame, shape)` is called for frames with a
    face (identity statistics hook into the same pass, so frames are decoded once)."""
    tracker = FaceTracker(models, detect_every, max_track, fallback_box)
    points, found = [], []
    for i, frame in enumerate(frames):
        p, shape, _ = tracker(frame)
        found.append(p is not None)
        points.append(p if p is not None else np.full((68, 2), np.nan))
        if p is not None and on_frame is not None:
            on_frame(i, frame, shape)
    pts = np.stack(points) if points else np.zeros((0, 68, 2))
    return FaceTrack(points=pts, found=np.array(found, bool), detections=tracker.detections,
                     held=tracker.held, fallback=tracker.fallback)


def fill_gaps(values: np.ndarray) -> np.ndarray:
    """Linear interpolation over NaN entries (held at the ends); all-NaN stays all-NaN."""
    values = np.asarray(values, np.float64)
    ok = np.isfinite(values)
    if ok.all() or not ok.any():
        return values.copy()
    idx = np.arange(len(values))
    return np.interp(idx, idx[ok], values[ok])
