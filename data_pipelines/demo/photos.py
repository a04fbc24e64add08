"""Real face photos that ship inside packages, and face rigs placed from their 68 landmarks.

| name        | who                  | where it ships                                              | licence / note |
|-------------|----------------------|-------------------------------------------------------------|----------------|
| astronaut   | Eileen Collins       | scikit-image wheel, `skimage.data.astronaut()`              | NASA, public domain |
| hopper      | Grace Hopper         | matplotlib wheel, `mpl-data/sample_data/grace_hopper.jpg`   | US Navy, public domain |
| obama       | Barack Obama         | face_recognition 1.3.0 sdist, `tests/test_images/obama.jpg` | White House portrait, public domain; package MIT |
| biden       | Joe Biden            | face_recognition 1.3.0 sdist, `tests/test_images/biden.jpg` | White House photo, public domain; package MIT |

The face_recognition photos are in no wheel: `fetch_sdist_photos` downloads the sdist into a cache
folder (`packages.sdist_file`) and reads the two files out of the archive (the package itself is
never installed or imported).

`rig_from_landmarks` turns dlib's 68 points into the `FaceRig` the animator moves, with a
face-aligned square crop: centred between the eyes and the mouth, `crop_scale` inter-ocular
distances wide, so every identity fills the frame the same way whatever the photo's framing.
The photo is resized (antialiased) first so the crop maps 1:1 onto the output frame: the warp
then samples at the photo's own resolution, with no aliasing from sampling a bigger image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from data_pipelines.demo.packages import PackageFileUnavailable, sdist_file
from data_pipelines.demo.sources import FaceRig, astronaut_rig

FACE_RECOGNITION_SDIST = "face_recognition==1.3.0"
SDIST_PHOTOS = {"obama": "tests/test_images/obama.jpg", "biden": "tests/test_images/biden.jpg"}
ALL_FACES = ("astronaut", "hopper", "obama", "biden")
DEFAULT_CROP_SCALE = 3.6    # crop side in inter-ocular distances


class PhotoUnavailable(RuntimeError):
    """A photo whose package could not be found or fetched (the message says which and why)."""


def _astronaut() -> np.ndarray:
    from skimage import data
    return data.astronaut()


def _hopper() -> np.ndarray:
    import matplotlib.cbook
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def fetch_sdist_photos(cache: str) -> dict[str, str]:
    """{name: path} of the face_recognition sdist's photos, downloaded once into `cache`."""
    try:
        return {name: sdist_file(FACE_RECOGNITION_SDIST, rel, cache)
                for name, rel in SDIST_PHOTOS.items()}
    except PackageFileUnavailable as e:
        raise PhotoUnavailable(str(e)) from None


def load_photo(name: str, cache: str) -> np.ndarray:
    """uint8 [H, W, 3] of a face in `ALL_FACES`."""
    if name == "astronaut":
        return _astronaut()
    if name == "hopper":
        return _hopper()
    if name in SDIST_PHOTOS:
        with Image.open(fetch_sdist_photos(cache)[name]) as im:
            return np.asarray(im.convert("RGB"))
    raise ValueError(f"unknown face {name!r}; choose from {ALL_FACES}")


def rig_from_landmarks(image: np.ndarray, points: np.ndarray, name: str, size: int,
                       crop_scale: float = DEFAULT_CROP_SCALE) -> FaceRig:
    """The rig of a photo from its dlib 68 points [68, 2] (x, y pixels), resized so the
    face-aligned crop is `size` pixels wide (see the module docstring)."""
    points = np.asarray(points, np.float64)
    left, right = points[36:42].mean(0), points[42:48].mean(0)
    iod = float(np.linalg.norm(right - left))
    if iod < 8:
        raise ValueError(f"{name}: eyes {iod:.1f} px apart: the face is too small to animate")
    mouth = points[60:68].mean(0)                     # where the lips meet
    eyes_mid = (left + right) / 2
    centre = np.array([eyes_mid[0], 0.5 * (eyes_mid[1] + mouth[1]) + 0.08 * iod])
    factor = size / (crop_scale * iod)                # photo px → output px
    h, w = image.shape[:2]
    resized = Image.fromarray(np.asarray(image, np.uint8)).resize(
        (max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.LANCZOS)
    s = lambda p: tuple(float(v) * factor for v in p)
    eye_w = 0.5 * (np.linalg.norm(points[39] - points[36]) + np.linalg.norm(points[45] - points[42]))
    return FaceRig(
        image=np.asarray(resized, np.float32), crop_center=s(centre), crop_size=float(size),
        mouth_center=s(mouth),
        mouth_half_width=float(0.5 * np.linalg.norm(points[54] - points[48]) * factor),
        chin_y=float(points[8, 1] * factor),
        eyes=(s(left), s(right)),
        eye_half_size=(float(0.5 * eye_w * factor), float(0.2 * eye_w * factor)),
        name=name)


def face_rig(name: str, size: int, cache: str, crop_scale: float | None = None,
             models=None) -> FaceRig:
    """A rig for a named face. `crop_scale` None keeps the astronaut's hand-placed rig (the
    original demo framing); any other face, or a given scale, places it from dlib landmarks."""
    if name == "astronaut" and crop_scale is None:
        return astronaut_rig()
    image = load_photo(name, cache)
    if models is None:
        from keyface_jax.eval.faces import FaceModels
        models = FaceModels()
    boxes = models.detect(image)
    if not len(boxes):
        raise ValueError(f"{name}: dlib finds no face in the photo")
    from keyface_jax.eval.faces import shape_points
    points = shape_points(models.shape(image, boxes[0]))
    return rig_from_landmarks(image, points, name, size, crop_scale or DEFAULT_CROP_SCALE)
