"""Animating one face photo: head pose, jaw opening, lip widening/smile and blinks, by warping.

Every output pixel is mapped back into the photo (backward warp, bilinear):

1. camera: output pixel → photo coordinates of a fixed square face crop;
2. head pose: the inverse of a similarity transform (rotation about a neck pivot, translation,
   scale) moves that point onto the head;
3. eyelids: inside each eye's almond, rows above the lid line sample the lid skin just above
   the eye (compressed), and a soft lash line darkens the lid edge;
4. lips: a smooth horizontal field widens the mouth and lifts its corners (smile); a per-column
   vertical map splits the face at the lip line: the upper lip rises a little (a band above is
   compressed), the lower lip, chin and jaw translate down (a band below the gap is stretched so
   the cheeks stay continuous; the displacement fades out under the chin). The gap between the
   lips — an almond whose height follows the opening — is painted as the mouth cavity.

All maps are monotone per column (no fold-overs) except the deliberate lip split.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from data_pipelines.demo.sources import FaceRig


@dataclasses.dataclass
class FacePose:
    """Per-frame animation controls (scalars)."""

    rotation: float = 0.0      # degrees, positive = counter-clockwise on screen
    shift_x: float = 0.0       # head translation, fraction of the crop side
    shift_y: float = 0.0
    scale: float = 1.0
    mouth_open: float = 0.0    # 0 closed … 1 wide open (≈ 30 % of the mouth width)
    mouth_wide: float = 0.0    # 0 … 1: corners pulled outwards
    smile: float = 0.0         # −1 … 1: corners down / up
    blink: float = 0.0         # 0 open … 1 closed


THROAT = np.array([44.0, 17.0, 20.0])   # RGB inside the open mouth
TONGUE = np.array([128.0, 60.0, 62.0])


def _unit(x):
    return np.minimum(np.maximum(x, 0.0), 1.0)


def _smoothstep(x):
    x = _unit(x)
    return x * x * (3 - 2 * x)


class FaceAnimator:
    """Renders `FacePose`s of a `FaceRig` as [size, size, 3] uint8 frames."""

    # Bands in photo pixels for a mouth 21.5 px half-wide (the astronaut's); scaled with the mouth.
    UPPER_BAND = 8.0     # above the lip line, compressed when the upper lip rises
    LOWER_BAND = 18.0    # below the gap, stretched to keep the cheeks continuous
    CHIN_FADE = 25.0     # the jaw displacement fades to zero this far under the chin
    REFERENCE_HALF_WIDTH = 21.5

    def __init__(self, rig: FaceRig, size: int = 256, max_open: float = 0.3):
        """max_open: the lip gap at mouth_open = 1, as a fraction of the mouth width."""
        self.rig, self.size = rig, int(size)
        self.max_open = max_open * 2 * rig.mouth_half_width     # lip gap at mouth_open = 1
        k = rig.mouth_half_width / self.REFERENCE_HALF_WIDTH
        self.upper_band, self.lower_band, self.chin_fade = (
            self.UPPER_BAND * k, self.LOWER_BAND * k, self.CHIN_FADE * k)
        cx, cy = rig.crop_center
        step = rig.crop_size / self.size
        coords = (np.arange(self.size) + 0.5 - self.size / 2) * step
        self._gx, self._gy = np.meshgrid(cx + coords, cy + coords)
        self.pivot = (rig.mouth_center[0], rig.chin_y + 0.25 * rig.crop_size)   # about the neck
        self._channels = [np.ascontiguousarray(rig.image[..., c]) for c in range(3)]

    def mouth_box(self) -> tuple[float, float, float, float]:
        """(top, bottom, left, right) of the frame, as fractions, that the lips move in at rest
        head pose: the mouth's width with a margin, from above the upper lip to below the lower
        lip at full opening (e.g. for a loss weight on the mouth; head drift moves it a little)."""
        rig = self.rig
        mx, my = rig.mouth_center
        mw = rig.mouth_half_width
        x0 = rig.crop_center[0] - rig.crop_size / 2
        y0 = rig.crop_center[1] - rig.crop_size / 2
        top = my - 0.35 * mw - 0.25 * self.max_open     # the lips' own thickness: ~0.35 mw
        bottom = my + 0.35 * mw + self.max_open
        box = ((top - y0), (bottom - y0), (mx - 1.3 * mw - x0), (mx + 1.3 * mw - x0))
        return tuple(round(min(1.0, max(0.0, v / rig.crop_size)), 4) for v in box)

    def _head(self, pose: FacePose):
        """Output grid → photo coordinates on the moving head (inverse similarity transform)."""
        px, py = self.pivot
        th = np.deg2rad(pose.rotation)
        x = self._gx - px - pose.shift_x * self.rig.crop_size
        y = self._gy - py - pose.shift_y * self.rig.crop_size
        c, s = np.cos(th) / pose.scale, np.sin(th) / pose.scale
        # +θ in these y-down axes turns the sampling grid clockwise, i.e. the head counter-clockwise
        return px + c * x - s * y, py + s * x + c * y

    def _eye(self, x, y, eye, blink: float):
        """Lid over one eye (ROI arrays): (alpha, lid-skin y map, lash-line darkening)."""
        ex, ey = eye
        hw, hh = self.rig.eye_half_size
        ax = (x - ex) / hw
        arc = np.maximum(1 - ax ** 2, 0) ** 0.6
        top = ey - 1.1 * hh * arc
        bottom = ey + 0.9 * hh * arc
        lid = top + blink * (bottom - top + 1.0)
        # feathered almond: 1 px at the lid edge, 1.5 px towards the corners
        alpha = (_unit(lid - y + 0.5) * _unit(y - top + 1.5) * _unit((1 - np.abs(ax)) * hw / 1.5))
        skin_y = top - 1.0 - 0.35 * (lid - y)        # the lid skin just above the eye, compressed
        lash = _unit(1.1 - np.abs(ax)) * min(1.0, 3 * blink) * np.exp(-((y - lid) / 0.8) ** 2)
        return alpha, skin_y, lash

    def _lips(self, x, y, pose: FacePose):
        """Widening/smile field, then the per-column jaw map → (x, y, cavity alpha, depth)."""
        mx, my = self.rig.mouth_center
        mw = self.rig.mouth_half_width
        rx, ry = (x - mx) / mw, (y - my) / (0.9 * mw)
        local = np.exp(-1.5 * ry ** 2) * np.exp(-((rx / 1.6) ** 4))
        x1 = x - pose.mouth_wide * 0.22 * mw * np.tanh(rx) * local
        y1 = y + pose.smile * 2.5 * np.tanh(rx) ** 2 * local
        rx1 = (x1 - mx) / mw
        # the opening spans the inner lip corners, a little inside the outer ones
        lens = np.sqrt(_unit(1 - (rx1 / (0.85 + 0.15 * pose.mouth_wide)) ** 2))
        d_open = pose.mouth_open * self.max_open
        up = 0.25 * d_open * np.sqrt(lens)
        gap = 0.75 * d_open * lens
        jaw = 0.75 * d_open * np.exp(-((rx1 / 1.5) ** 2))
        a, b = self.upper_band, self.lower_band
        fade = _unit(1 - (y1 - self.rig.chin_y) / self.chin_fade)
        src = np.where(y1 < my - up - a, y1, my - (my - up - y1) * (a + up) / a)
        src = np.where(y1 >= my - up, my, src)
        src = np.where(y1 >= my + gap, my + (y1 - my - gap) * (gap + b - jaw) / b, src)
        src = np.where(y1 >= my + gap + b, y1 - jaw * fade, src)
        alpha = _unit(np.minimum(y1 - (my - up), my + gap - y1) / 1.2 + 0.5)
        alpha = alpha * (up + gap > 0.3)
        depth = _unit((y1 - (my - up)) / np.maximum(up + gap, 1e-3))
        return x1, src, alpha, depth

    def _sample(self, x, y) -> np.ndarray:
        coords = np.stack([np.ravel(y) - 0.5, np.ravel(x) - 0.5])   # pixel centres at k + 0.5
        out = np.stack([ndimage.map_coordinates(ch, coords, order=1, mode="nearest",
                                                prefilter=False) for ch in self._channels], -1)
        return out.reshape(np.shape(x) + (3,))

    def _roi(self, x, y, x0, x1, y0, y1):
        """Bounding slices of the output pixels whose photo coordinates fall in a box."""
        inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if rows.size == 0 or cols.size == 0:
            return None
        return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)

    def render(self, pose: FacePose) -> np.ndarray:
        rig = self.rig
        x, y = self._head(pose)
        mx, my = rig.mouth_center
        mw = rig.mouth_half_width
        # the lip fields are negligible (< 0.05 px) outside this box
        lips = self._roi(x, y, mx - 3.5 * mw, mx + 3.5 * mw, my - 2.0 * mw,
                         rig.chin_y + self.chin_fade + 1)
        if lips is not None:
            x, y = x.copy(), y.copy()
            lx, ly, alpha, depth = self._lips(x[lips], y[lips], pose)
            x[lips], y[lips] = lx, ly
        img = self._sample(x, y)
        if lips is not None and np.any(alpha > 0):
            # shadowed throat under the upper teeth, a hint of tongue towards the lower lip
            tongue = _smoothstep((depth - 0.4) / 0.55)[..., None]
            cavity = (1 - tongue) * THROAT + tongue * TONGUE
            img[lips] = img[lips] * (1 - alpha[..., None]) + cavity * alpha[..., None]
        if pose.blink > 1e-3:
            hw, hh = rig.eye_half_size
            for eye in rig.eyes:
                roi = self._roi(x, y, eye[0] - 1.2 * hw, eye[0] + 1.2 * hw,
                                eye[1] - 1.1 * hh - 2.0, eye[1] + 0.9 * hh + 4.0)
                if roi is None:
                    continue
                alpha, skin_y, lash = self._eye(x[roi], y[roi], eye, pose.blink)
                patch = img[roi]
                skin = self._sample(x[roi], skin_y) * 0.93     # lids sit a little in shadow
                patch = patch * (1 - alpha[..., None]) + skin * alpha[..., None]
                img[roi] = patch * (1 - 0.55 * lash[..., None])
        return np.clip(img + 0.5, 0, 255).astype(np.uint8)
