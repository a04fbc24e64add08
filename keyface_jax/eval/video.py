"""One pass over a generated video: lip sync, silence/NSV mouth activity, identity and drift.

    report = evaluate_file("out.mp4", audio="speech.wav", identity="face.png",
                           manifest="segments.json")

Frames are streamed at 25 fps (`keyface_jax.media.video.FrameReader`, so memory does not grow
with the clip), each through the face tracker, every `identity_stride`-th also through the face
descriptor. The audio is the given file, else the video's own soundtrack, decoded to 16 kHz mono.
The identity is the given image, else the video's first frame.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

from keyface_jax.eval import faces, identity, lipsync

FPS = lipsync.FPS


def analyze(frames: Iterable[np.ndarray], waveform: np.ndarray | None, *,
            identity_image: np.ndarray | None = None, segments: list[dict] | None = None,
            fps: float = FPS, audio_rate: int = lipsync.AUDIO_RATE,
            window_seconds: float = 5.0, identity_stride: int = 10, detect_every: int = 5,
            max_track: int = 25, max_lag: int = 2, control_shift: float = 1.0,
            guard_frames: int = 2, measure_identity: bool = True,
            models: faces.FaceModels | None = None, identity_box_fallback: bool = False,
            compare_images: dict[str, np.ndarray] | None = None) -> dict:
    """The report for RGB uint8 frames [H, W, 3] at `fps` and a mono waveform whose sample 0 is
    the first frame (None: no lip-sync or silence metrics).

    identity_box_fallback: frames where no face is tracked are measured inside the identity
    image's face box (scaled to the frame; for generated videos, which keep the identity crop's
    framing) instead of being left out. compare_images: {name: image} of other faces; the report
    gives the face samples' mean similarity to each (is the output closer to its own identity?).
    """
    models = models or faces.FaceModels()
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("the video has no frames")
    reference_image = identity_image if identity_image is not None else first
    ref = None
    if measure_identity:
        ref = identity.identity_sample(models, reference_image)
    fallback = None
    if identity_box_fallback:
        boxes = models.detect(reference_image)
        if not len(boxes):
            raise ValueError("identity_box_fallback: no face found in the identity image")
        scale = np.tile(np.divide(first.shape[1::-1], reference_image.shape[1::-1]), 2)
        fallback = boxes[0] * scale
    samples: list[identity.FaceSample] = []

    def on_frame(i, image, shape):
        if measure_identity and i % identity_stride == 0:
            samples.append(identity.face_sample(models, i, image, shape))

    def all_frames():
        yield first
        yield from frames

    track = faces.track_face(all_frames(), models, detect_every, max_track, on_frame, fallback)
    n = track.num_frames
    raw = track.openings()
    opening = faces.fill_gaps(raw)
    report = dict(fps=fps, num_frames=n, duration=n / fps,
                  face=dict(frames_with_face=int(track.found.sum()),
                            detector_runs_found=track.detections,
                            interpolated_frames=int((~track.found).sum()),
                            held_box_frames=track.held, fallback_box_frames=track.fallback,
                            detect_every=detect_every, max_track=max_track),
                  mouth=dict(mean_opening=float(np.nanmean(raw)) if track.found.any() else None,
                             motion_energy=float(np.mean(np.abs(np.diff(opening))))
                             if n > 1 and track.found.any() else None))
    if measure_identity:
        rows = [identity.sample_row(s, ref, fps) for s in samples]
        wins = identity.windows(rows, n, fps, window_seconds)
        report["identity"] = dict(
            reference=dict(sharpness=ref.sharpness, lab_mean=[float(v) for v in ref.lab_mean],
                           self_similarity=1.0),
            window_seconds=window_seconds, stride_frames=identity_stride,
            summary=identity.drift_summary(wins, ref), windows=wins, samples=rows)
        if compare_images:
            report["identity"]["compare"] = identity.compare(
                samples, ref, {name: identity.identity_sample(models, image)
                               for name, image in compare_images.items()})
    report["signals"] = dict(
        mouth_opening=[None if not np.isfinite(v) else round(float(v), 5) for v in raw],
        loudness_db=None)
    return finish(report, waveform, segments, max_lag, control_shift, guard_frames, audio_rate)


def load_segments(manifest_path: str, video_path: str | None = None) -> list[dict]:
    """Segments from a demo manifest (the entry whose video or name matches `video_path`), a
    {"segments": [...]} object or a bare list of {kind, start, end}."""
    with open(manifest_path) as f:
        data = json.load(f)
    if isinstance(data, list):
        return data
    if "segments" in data:
        return data["segments"]
    videos = data.get("videos", [])
    if video_path is not None:
        stem = os.path.splitext(os.path.basename(video_path))[0]
        for v in videos:
            if v.get("name") == stem or os.path.basename(v.get("video", "")) == \
                    os.path.basename(video_path):
                return v["segments"]
    if len(videos) == 1:
        return videos[0]["segments"]
    raise ValueError(f"{manifest_path}: no entry for {video_path!r} among {len(videos)} videos")


def read_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def evaluate_file(video: str, *, audio: str | None = None, identity_path: str | None = None,
                  manifest: str | None = None, compare: dict[str, str] | None = None,
                  **kwargs) -> dict:
    """`analyze` on a video file (see the module docstring for where audio and identity come
    from). Raises keyface_jax.media.MediaError for unreadable media."""
    from keyface_jax.media.audio import align_to_frames, read_audio
    from keyface_jax.media.errors import MediaError
    from keyface_jax.media.video import FrameReader

    reader = FrameReader(video, FPS)
    frames = iter(reader)
    segments = load_segments(manifest, video) if manifest else None
    image = read_image(identity_path) if identity_path else None
    # the frame pass needs the frame count before the audio can be aligned: decode audio after
    others = {name: read_image(path) for name, path in (compare or {}).items()}
    report = analyze(frames, None, identity_image=image, segments=None, compare_images=others,
                     **kwargs)
    n = report["num_frames"]
    wave, audio_note = None, None
    try:
        source = read_audio(audio or video)
        start = source.start_time if audio else reader.start_time
        wave = align_to_frames(source, start, n, FPS)
    except MediaError as e:
        audio_note = f"no audio ({e}): lip-sync and silence metrics skipped"
    if wave is not None or segments:
        finish(report, wave, segments, **{k: v for k, v in kwargs.items()
                                          if k in ("max_lag", "control_shift", "guard_frames")})
    report["video"] = os.path.abspath(video)
    report["audio"] = os.path.abspath(audio) if audio else ("video soundtrack" if wave is not None
                                                            else None)
    report["identity_source"] = os.path.abspath(identity_path) if identity_path else "first frame"
    if manifest:
        report["manifest"] = os.path.abspath(manifest)
    if audio_note:
        report["audio_note"] = audio_note
    return report


def finish(report: dict, waveform: np.ndarray | None, segments: list[dict] | None,
           max_lag: int = 2, control_shift: float = 1.0, guard_frames: int = 2,
           audio_rate: int = lipsync.AUDIO_RATE) -> dict:
    """Adds the audio-dependent parts to a report made with waveform=None, from its per-frame
    mouth signal (stored to 5 decimals)."""
    fps, n = report["fps"], report["num_frames"]
    raw = np.array([np.nan if v is None else v for v in report["signals"]["mouth_opening"]])
    opening = faces.fill_gaps(raw)
    if waveform is not None:
        loud = lipsync.loudness_db(waveform, n, audio_rate, fps)
        report["lip_sync"] = lipsync.lip_sync(opening, loud, fps, max_lag, control_shift)
        report["silence"] = lipsync.silence_report(opening, loud, segments, fps, guard_frames)
        report["signals"]["loudness_db"] = [round(float(v), 3) for v in loud]
    elif segments:
        labels = lipsync.labels_from_segments(segments, n, fps)
        report["silence"] = dict(source="manifest", guard_frames=guard_frames,
                                 by_label=lipsync.mouth_activity(opening, labels, guard_frames))
    return report
