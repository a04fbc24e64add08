"""Lip sync by motion, and mouth behaviour in silence, speech and non-speech vocalisations.

Signals, one value per 25 fps video frame:
- audio loudness: RMS level in dB of the frame's own 16 kHz span (640 samples), floored at
  `floor_db` below the clip's 99th percentile, so silence is one flat level whatever its noise;
- mouth opening: the inner-lip gap over the inter-ocular distance (`faces.mouth_opening`),
  linearly interpolated over frames without a face.

Lip sync is the Pearson correlation of the two at lags −max_lag … +max_lag frames; lag k
compares mouth[t] with loudness[t − k], so a positive best lag means the mouth trails the sound.
The control is the same measurement with the soundtrack delayed by `control_shift` seconds
(non-circular: only the overlap is compared). A talking face that follows its audio scores far
above its own shifted control; the bar for later use is r ≥ 0.5 and r ≥ 3 × the control's r
(`ratio_to_control` is None when the control's r ≤ 0, which meets the ratio part).

Silence and non-speech: each frame gets a label, from a segment manifest (demo format: a list of
{kind, start, end} in seconds) or else from the loudness (voiced / silence). Per label the report
gives the mouth's motion energy (mean |Δ opening| per frame) and openness (mean opening above the
clip's closed-mouth level, its 5th percentile), with `guard` frames trimmed off both ends of every
span so transitions do not count.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from keyface_jax.generation.plan import STRIDE   # KeyFace's keyframe spacing

FPS = 25.0
AUDIO_RATE = 16_000
BAR_R = 0.5
BAR_RATIO = 3.0


def loudness_db(waveform: np.ndarray, num_frames: int, rate: int = AUDIO_RATE,
                fps: float = FPS, floor_db: float = 50.0) -> np.ndarray:
    """[num_frames] RMS dB per video frame (see the module docstring); the waveform is mono,
    sample 0 at the first frame, zero-padded if short."""
    wave = np.asarray(waveform, np.float64)
    edges = np.round(np.arange(num_frames + 1) * rate / fps).astype(int)
    if edges[-1] > len(wave):
        wave = np.pad(wave, (0, edges[-1] - len(wave)))
    power = np.array([np.mean(wave[a:b] ** 2) if b > a else 0.0
                      for a, b in zip(edges[:-1], edges[1:])])
    db = 10.0 * np.log10(power + 1e-12)
    if num_frames == 0:
        return db
    top = np.percentile(db, 99)
    return np.maximum(db, top - floor_db)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; 0.0 when either signal is constant (a still mouth carries no sync)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3:
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    if den <= 1e-12 * max(len(x), 1):
        return 0.0
    return float((x * y).sum() / den)


def lagged_correlation(mouth: np.ndarray, sound: np.ndarray, max_lag: int = 2,
                       shift: int = 0) -> dict:
    """r(k) = corr(mouth[t], sound[t − shift − k]) over the overlap, for k in ±max_lag."""
    mouth, sound = np.asarray(mouth, np.float64), np.asarray(sound, np.float64)
    n = min(len(mouth), len(sound))
    rs = {}
    for k in range(-max_lag, max_lag + 1):
        d = shift + k
        if d >= 0:
            a, b = mouth[d:n], sound[:n - d]
        else:
            a, b = mouth[:n + d], sound[-d:n]
        rs[k] = pearson(a, b) if len(a) >= 3 else 0.0
    best = max(rs, key=lambda k: (rs[k], -abs(k)))
    return dict(r=rs[best], lag=int(best), r_lag0=rs[0],
                r_by_lag={str(k): v for k, v in rs.items()},
                frames=int(n - abs(shift)))


def keyframe_split(opening: np.ndarray, loud_db: np.ndarray, stride: int = STRIDE) -> dict:
    """Lag-0 r over the keyframe positions (frames 0, stride, 2·stride, …) and over the frames
    between them: which of KeyFace's two models loses the sync (meaningless for other videos)."""
    opening, loud_db = np.asarray(opening, np.float64), np.asarray(loud_db, np.float64)
    n = min(len(opening), len(loud_db))
    opening, loud_db = opening[:n], loud_db[:n]
    keyframe = np.arange(n) % stride == 0
    return dict(stride=stride, keyframes_r=pearson(opening[keyframe], loud_db[keyframe]),
                keyframes=int(keyframe.sum()),
                inbetween_r=pearson(opening[~keyframe], loud_db[~keyframe]),
                inbetween=int((~keyframe).sum()))


def lip_sync(opening: np.ndarray, loud_db: np.ndarray, fps: float = FPS, max_lag: int = 2,
             control_shift: float = 1.0, keyframe_stride: int = STRIDE) -> dict:
    """Lip-sync correlation, its shifted-audio control, whether the bar is met, and the lag-0 r
    split into keyframe and in-between frames (`keyframe_split`)."""
    opening = np.asarray(opening, np.float64)
    if not np.isfinite(opening).any():
        return dict(r=None, lag=None, note="no face found in any frame")
    main = lagged_correlation(opening, loud_db, max_lag)
    shift = int(round(control_shift * fps))
    control = lagged_correlation(opening, loud_db, max_lag, shift)
    ratio = main["r"] / control["r"] if control["r"] > 1e-9 else None
    passes = bool(main["r"] >= BAR_R and main["r"] >= BAR_RATIO * max(control["r"], 0.0))
    out = dict(main, control=dict(shift_seconds=control_shift, r=control["r"],
                                  lag=control["lag"], frames=control["frames"]),
               ratio_to_control=ratio, bar=dict(min_r=BAR_R, min_ratio=BAR_RATIO,
                                                passed=passes),
               keyframe_split=keyframe_split(opening, loud_db, keyframe_stride))
    if np.ptp(opening) < 1e-9:
        out["note"] = "the mouth does not move: r is 0 by definition"
    return out


def voiced_from_loudness(loud_db: np.ndarray, fraction: float = 0.35, min_frames: int = 3
                         ) -> np.ndarray:
    """[N] bool: frames louder than floor + fraction × (peak − floor) (floor = 5th percentile,
    peak = 98th), with runs shorter than `min_frames` closed/opened (morphological smoothing)."""
    loud_db = np.asarray(loud_db, np.float64)
    if len(loud_db) == 0:
        return np.zeros(0, bool)
    lo, hi = np.percentile(loud_db, 5), np.percentile(loud_db, 98)
    if hi - lo < 6.0:  # less than 6 dB of dynamics: all silence, or all sound
        return np.full(len(loud_db), hi > -45.0)
    mask = loud_db > lo + fraction * (hi - lo)
    if min_frames > 1:
        structure = np.ones(min_frames, bool)
        mask = ndimage.binary_closing(mask, structure)
        mask = ndimage.binary_opening(mask, structure)
    return mask


def labels_from_segments(segments: list[dict], num_frames: int, fps: float = FPS
                         ) -> np.ndarray:
    """[N] object array of segment kinds ('' where no segment covers the frame centre)."""
    labels = np.full(num_frames, "", dtype=object)
    centres = (np.arange(num_frames) + 0.5) / fps
    for seg in segments:
        inside = (centres >= float(seg["start"])) & (centres < float(seg["end"]))
        labels[inside] = str(seg["kind"])
    return labels


def _spans(labels: np.ndarray):
    """(label, start, end) runs of equal labels."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append((labels[start], start, i))
            start = i
    return out


def mouth_activity(opening: np.ndarray, labels: np.ndarray, guard: int = 2) -> dict:
    """Per label: frames counted, spans, motion energy (mean |Δ opening| per frame, in
    inter-ocular units) and openness (mean opening above the clip's 5th percentile)."""
    opening = np.asarray(opening, np.float64)
    if not np.isfinite(opening).any():
        return {}
    closed = float(np.nanpercentile(opening, 5))
    step = np.abs(np.diff(opening, prepend=opening[:1]))
    keep = {}
    for label, a, b in _spans(np.asarray(labels, dtype=object)):
        if label == "":
            continue
        a2, b2 = a + guard, b - guard
        if b2 - a2 < 1:
            continue
        idx = np.arange(max(a2, 1), b2)      # a frame's step needs its predecessor in the span
        entry = keep.setdefault(label, dict(open_idx=[], step_idx=[], spans=0))
        entry["open_idx"].append(np.arange(a2, b2))
        entry["step_idx"].append(idx)
        entry["spans"] += 1
    out = {}
    for label, entry in keep.items():
        oi = np.concatenate(entry["open_idx"])
        si = np.concatenate(entry["step_idx"])
        out[label] = dict(frames=int(len(oi)), spans=entry["spans"],
                          motion_energy=float(step[si].mean()) if len(si) else 0.0,
                          openness=float(np.mean(opening[oi] - closed)))
    return out


def silence_report(opening: np.ndarray, loud_db: np.ndarray, segments: list[dict] | None = None,
                   fps: float = FPS, guard: int = 2) -> dict:
    """Mouth activity by label (manifest segments if given, else voiced/silence from loudness),
    plus silence/voiced ratios (small means the mouth rests in pauses)."""
    n = len(opening)
    if segments:
        labels = labels_from_segments(segments, n, fps)
        labels = np.where(labels == "speech", "voiced", labels)
        source = "manifest"
    else:
        labels = np.where(voiced_from_loudness(loud_db), "voiced", "silence").astype(object)
        source = "loudness"
    activity = mouth_activity(opening, labels, guard)
    out = dict(source=source, guard_frames=guard, by_label=activity)
    if "silence" in activity and "voiced" in activity:
        v, s = activity["voiced"], activity["silence"]
        out["silence_to_voiced_motion"] = (s["motion_energy"] / v["motion_energy"]
                                           if v["motion_energy"] > 0 else None)
        out["silence_to_voiced_openness"] = (s["openness"] / v["openness"]
                                             if v["openness"] > 0 else None)
    return out
