"""Identity and drift over time, against the identity frame.

Every `stride`-th frame with a face is reduced to its aligned face chip (dlib's 150×150, 25 %
padding), and the chip to:
- `similarity`: cosine similarity of dlib's 128-d face descriptor with the identity's (about
  0.98 for the same face in these tests, about 0.8 for other people), and `distance`, the
  Euclidean descriptor distance (dlib's same-person rule: < 0.6);
- colour moments in CIE Lab (D65; L in 0…100): per-channel mean and standard deviation, and
  `delta_e`, the distance between the mean colours of the chip and the identity's (CIE76);
- `sharpness`: the variance of the Laplacian of the grey chip.

Samples are grouped into windows of `window_seconds` and averaged; the drift summary compares
the last window with the first. The bar for later use: the last window's similarity within 5 %
of the first window's. Sharpness is reported relative to the first window (relative to the
identity only means something when the identity image has the video's resolution).
"""

from __future__ import annotations

import dataclasses

import numpy as np

BAR_DRIFT = 0.05


def laplacian_variance(image: np.ndarray) -> float:
    """Sharpness: the variance of the Laplacian of an RGB uint8 image's grey levels."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float64)
    return float(cv2.Laplacian(grey, cv2.CV_64F, ksize=1).var())


def face_colour_and_sharpness(chip: np.ndarray) -> dict:
    """Lab moments and Laplacian variance of an RGB uint8 chip."""
    import cv2

    rgb = np.ascontiguousarray(chip).astype(np.float32) / 255.0
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
    return dict(lab_mean=lab.mean(0), lab_std=lab.std(0), sharpness=laplacian_variance(chip))


@dataclasses.dataclass
class FaceSample:
    frame: int
    embedding: np.ndarray     # [128]
    lab_mean: np.ndarray      # [3]
    lab_std: np.ndarray       # [3]
    sharpness: float


def face_sample(models, frame_index: int, image: np.ndarray, shape) -> FaceSample:
    chip = models.chip(image, shape)
    stats = face_colour_and_sharpness(chip)
    return FaceSample(frame=frame_index, embedding=models.embed_chip(chip), **stats)


def identity_sample(models, image: np.ndarray) -> FaceSample:
    """The reference: the largest face of the identity image. ValueError if there is none."""
    boxes = models.detect(image)
    if not len(boxes):
        raise ValueError("no face found in the identity image")
    return face_sample(models, -1, image, models.shape(image, boxes[0]))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def sample_row(s: FaceSample, ref: FaceSample, fps: float) -> dict:
    return dict(frame=s.frame, time=s.frame / fps,
                similarity=cosine(s.embedding, ref.embedding),
                distance=float(np.linalg.norm(s.embedding - ref.embedding)),
                delta_e=float(np.linalg.norm(s.lab_mean - ref.lab_mean)),
                lab_mean=[float(v) for v in s.lab_mean], lab_std=[float(v) for v in s.lab_std],
                sharpness=s.sharpness)


def windows(rows: list[dict], num_frames: int, fps: float, window_seconds: float = 5.0
            ) -> list[dict]:
    """Per-window means of the sample rows; windows without a sample are listed with
    samples=0. A last window shorter than half a window is merged into the previous one."""
    span = max(1, int(round(window_seconds * fps)))
    count = max(1, int(np.ceil(num_frames / span)))
    if count > 1 and num_frames - (count - 1) * span < span / 2:
        count -= 1
    out = []
    for w in range(count):
        start = w * span
        end = num_frames if w == count - 1 else (w + 1) * span
        sel = [r for r in rows if start <= r["frame"] < end]
        entry = dict(index=w, start=start / fps, end=end / fps, samples=len(sel))
        if sel:
            for key in ("similarity", "distance", "delta_e", "sharpness"):
                entry[key] = float(np.mean([r[key] for r in sel]))
            for key in ("lab_mean", "lab_std"):
                entry[key] = [float(v) for v in np.mean([r[key] for r in sel], axis=0)]
        out.append(entry)
    return out


def drift_summary(wins: list[dict], ref: FaceSample) -> dict:
    """First vs last window that has samples; the bar is a similarity drop of at most 5 %."""
    full = [w for w in wins if w["samples"]]
    if not full:
        return dict(passed=None, note="no face samples")
    first, last = full[0], full[-1]
    drop = (first["similarity"] - last["similarity"]) / max(first["similarity"], 1e-9)
    sharp = last["sharpness"] / first["sharpness"] if first["sharpness"] > 0 else None
    return dict(
        first_similarity=first["similarity"], last_similarity=last["similarity"],
        min_similarity=min(w["similarity"] for w in full),
        similarity_drop=drop, passed=bool(drop <= BAR_DRIFT), bar_max_drop=BAR_DRIFT,
        first_delta_e=first["delta_e"], last_delta_e=last["delta_e"],
        colour_drift_delta_e=float(np.linalg.norm(np.subtract(last["lab_mean"],
                                                              first["lab_mean"]))),
        sharpness_last_to_first=sharp,
        identity_sharpness=ref.sharpness,
        mean_similarity=float(np.mean([w["similarity"] for w in full])),
        mean_sharpness=float(np.mean([w["sharpness"] for w in full])),
        # the generated face's detail against its input crop's (meaningful when both are at the
        # video's resolution, as a generator's identity crop is)
        sharpness_to_identity=float(np.mean([w["sharpness"] for w in full]) / ref.sharpness)
        if ref.sharpness > 0 else None)


def compare(samples: list[FaceSample], ref: FaceSample, others: dict[str, FaceSample]) -> dict:
    """Mean descriptor similarity of the samples to their own identity and to each other face,
    and the nearest other face: does the video look more like its input than like the others?"""
    if not samples:
        return dict(note="no face samples")
    mean_to = lambda target: float(np.mean([cosine(s.embedding, target.embedding) for s in samples]))
    to_others = {name: mean_to(face) for name, face in others.items()}
    out = dict(own=mean_to(ref), others=to_others,
               input_to_others={name: cosine(ref.embedding, face.embedding)
                                for name, face in others.items()})
    if to_others:
        nearest = max(to_others, key=to_others.get)
        out.update(nearest_other=nearest, nearest_other_similarity=to_others[nearest],
                   closer_to_own=bool(out["own"] > to_others[nearest]))
    return out


def plot(report: dict, path: str) -> str | None:
    """A PNG of the per-window curves (and the lip-sync signals when present); returns a note
    instead of writing when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written (pip install matplotlib)"
    ident = report.get("identity") or {}
    samples, wins = ident.get("samples", []), ident.get("windows", [])
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    t = [s["time"] for s in samples]
    mid = [(w["start"] + w["end"]) / 2 for w in wins if w["samples"]]
    full = [w for w in wins if w["samples"]]
    axes[0].plot(t, [s["similarity"] for s in samples], ".", alpha=0.4, label="samples")
    axes[0].plot(mid, [w["similarity"] for w in full], "o-", label="window mean")
    axes[0].set_ylabel("face similarity\n(cosine, dlib)")
    axes[0].legend(loc="lower left")
    axes[1].plot(t, [s["delta_e"] for s in samples], ".", alpha=0.4)
    axes[1].plot(mid, [w["delta_e"] for w in full], "o-")
    axes[1].set_ylabel("ΔE (mean Lab)\nvs identity")
    axes[2].plot(t, [s["sharpness"] for s in samples], ".", alpha=0.4)
    axes[2].plot(mid, [w["sharpness"] for w in full], "o-")
    axes[2].set_ylabel("sharpness\n(var. Laplacian)")
    sig = report.get("signals") or {}
    if sig.get("mouth_opening"):
        fps = report.get("fps", 25.0)
        mouth = np.asarray(sig["mouth_opening"], np.float64)
        loud = np.asarray(sig["loudness_db"], np.float64)
        tt = np.arange(len(mouth)) / fps
        axes[3].plot(tt, (mouth - np.nanmin(mouth)) / (np.nanmax(mouth) - np.nanmin(mouth) + 1e-9),
                     label="mouth opening")
        axes[3].plot(tt, (loud - loud.min()) / (np.ptp(loud) + 1e-9), alpha=0.7,
                     label="audio loudness")
        axes[3].legend(loc="upper right")
        r = (report.get("lip_sync") or {}).get("r")
        if r is not None:
            axes[3].set_title(f"lip sync r = {r:.3f}", fontsize=9)
    axes[3].set_ylabel("normalised")
    axes[3].set_xlabel("time (s)")
    for w in wins:
        for ax in axes[:3]:
            ax.axvline(w["start"], color="0.85", lw=0.8, zorder=0)
    fig.suptitle(report.get("video", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None
