"""One video → its per-frame arrays (latents, audio tokens, valence/arousal, optional PNG crops).

Order of work, cheapest checks first: container and streams (metadata), audio decode (silence,
length against the metadata), face boxes (a first decoding pass, detector crops only), then one
streaming pass: decode → crop/resize (and PNG) in a background thread while the VAE encodes the
previous batch, so a long video never sits in memory. Exact length checks (too short, audio vs
video) are repeated on the decoded counts. Any reason to drop a file is a `MediaError`.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np

from data_pipelines.emotions import EmotionPredictor
from data_pipelines.latents import video_id
from keyface_jax.media.video_list import VideoItem
from keyface_jax.data.schema import AUDIO_RATE, CLIP_FRAMES, FPS, TOKENS_PER_FRAME
from keyface_jax.media import face_crop
from keyface_jax.media.audio import align_to_frames, peak_dbfs, read_audio
from keyface_jax.media.errors import MediaError
from keyface_jax.media.video import FrameReader, probe


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Everything that decides the prepared values (recorded in the dataset; a resumed run must
    use the same). Defaults follow the reference where it has one."""

    image_size: int = 512               # crops are image_size² (latents image_size/8)
    crop: str = "centre"                # centre | haar
    crop_scale: float = 1.6             # crop side / detected face side
    crop_smoothing: float = 5.0         # Gaussian sigma (frames) on box centre and size; inf: fixed
    detect_every: int = 5               # run the detector on every n-th 25 fps frame
    min_face_fraction: float = 0.5      # of detector runs that must find a face
    no_face: str = "skip"               # skip | centre (fallback crop)
    latent: str = "sample"              # sample (reference) | mode
    seed: int = 0                       # latent sampling noise
    vae: str = "random"                 # VAE weights: path, or 'random' (tests, smoke runs)
    audio_features: str = ""            # keyface_jax.audio.get_extractor spec (a+b concatenates)
    emotions: str = "neutral"           # folder | module:attr predictor | neutral
    emotion_length_tolerance: int = 2   # frames
    min_frames: int = CLIP_FRAMES       # shorter videos (at 25 fps) are skipped
    av_tolerance_s: float = 0.2         # max |audio duration - video duration|
    silence_db: float = -60.0           # audio peaking below this (dBFS) is "silent"
    store_frames: bool = False          # also store the PNG crops (keyframe pixel losses)

    def __post_init__(self):
        checks = [(self.crop in ("centre", "center", "haar"), "crop must be centre or haar"),
                  (self.no_face in ("skip", "centre"), "no_face must be skip or centre"),
                  (self.latent in ("sample", "mode"), "latent must be sample or mode"),
                  (self.image_size % 8 == 0 and self.image_size > 0,
                   "image_size must be a positive multiple of 8"),
                  (self.detect_every >= 1, "detect_every must be >= 1"),
                  (self.min_frames >= 1, "min_frames must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PrepareOptions: {message}")


@dataclasses.dataclass
class Tools:
    """What processing needs besides the options (built once per process)."""

    encoder: object                     # data_pipelines.latents.LatentEncoder
    audio: object                       # extractor: (waveform, num_frames) -> [n, 2, dim]
    emotions: object                    # data_pipelines.emotions source
    detector: object | None             # face detector, None for centre crops


def _check_lengths(audio_s: float, video_s: float, tolerance: float) -> None:
    if abs(audio_s - video_s) > tolerance:
        raise MediaError(f"audio/video length mismatch: audio {audio_s:.2f} s, video "
                         f"{video_s:.2f} s (tolerance {tolerance:g} s)")


def _check_frames(num_frames: int, opts: PrepareOptions) -> None:
    if num_frames < opts.min_frames:
        raise MediaError(f"too short: {num_frames} frames at {FPS} fps < min_frames "
                         f"{opts.min_frames}")


def face_boxes(path: str, opts: PrepareOptions, detector) -> np.ndarray | None:
    """Smoothed crop boxes [N, 3] from a detection pass, or None for a centre crop (also the
    `no_face=centre` fallback)."""
    detections, shape = [], None
    for k, frame in enumerate(FrameReader(path, FPS)):
        shape = frame.shape
        detections.append(detector(frame) if k % opts.detect_every == 0 else None)
    if shape is None:
        raise MediaError("no decodable video frames")
    checked = math.ceil(len(detections) / opts.detect_every)
    try:
        return face_crop.smooth_boxes(face_crop.track_faces(detections), shape[0], shape[1],
                                      scale=opts.crop_scale, sigma=opts.crop_smoothing,
                                      min_face_fraction=opts.min_face_fraction,
                                      detected_frames=checked)
    except MediaError:
        if opts.no_face == "centre":
            return None
        raise


def _crop_batches(reader: Iterable[np.ndarray], boxes: np.ndarray | None, size: int,
                  batch: int, pngs: bool) -> Iterator[tuple[np.ndarray, list[bytes]]]:
    crops = []
    for k, frame in enumerate(reader):
        if boxes is None:
            box = face_crop.centre_box(*frame.shape[:2])
        else:
            box = boxes[min(k, len(boxes) - 1)]
        crops.append(face_crop.crop_resize(frame, box, size))
        if len(crops) == batch:
            yield np.stack(crops), [face_crop.png_bytes(c) for c in crops] if pngs else []
            crops = []
    if crops:
        yield np.stack(crops), [face_crop.png_bytes(c) for c in crops] if pngs else []


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Runs `iterator` in a thread, `depth` items ahead (decoding and PIL release the GIL).
    Its exceptions are re-raised here; leaving the loop early stops the thread."""
    items: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        items.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    getattr(iterator, "close", lambda: None)()  # closes the open file
                    return
            items.put((done, None))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            items.put((done, e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def process_video(item: VideoItem, opts: PrepareOptions, tools: Tools
                  ) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, metadata) of one video; raises MediaError with the reason to skip it."""
    info = probe(item.path)
    if not info.has_audio:
        raise MediaError("no audio stream")
    if info.video_duration is not None:
        _check_frames(math.floor(info.video_duration * FPS + 1e-6), opts)
    audio = read_audio(item.path, AUDIO_RATE)
    peak = peak_dbfs(audio.waveform)
    if peak < opts.silence_db:
        raise MediaError(f"silent audio (peak {peak:.1f} dBFS < {opts.silence_db:g})")
    if info.video_duration is not None:
        _check_lengths(audio.duration, info.video_duration, opts.av_tolerance_s)

    boxes = face_boxes(item.path, opts, tools.detector) if tools.detector is not None else None
    reader = FrameReader(item.path, FPS)
    encoder, vid = tools.encoder, video_id(item.name)
    predictor = tools.emotions if isinstance(tools.emotions, EmotionPredictor) else None
    latents, pngs, emotions, done = [], [], [], 0
    batches = _crop_batches(reader, boxes, opts.image_size, encoder.batch_size,
                            opts.store_frames)
    for crops, crop_pngs in prefetch(batches):
        ids = np.arange(done, done + len(crops))
        latents.append(encoder.encode_batch(crops, ids, vid))  # async: fetched below
        if predictor is not None:
            emotions.append(predictor(crops))
        pngs.extend(crop_pngs)
        done += len(crops)
    n = reader.num_frames
    _check_frames(n, opts)
    _check_lengths(audio.duration, reader.duration, opts.av_tolerance_s)

    waveform = align_to_frames(audio, reader.start_time, n, FPS)
    tokens = np.asarray(tools.audio(waveform, n), np.float32)
    if tokens.ndim != 3 or tokens.shape[:2] != (n, TOKENS_PER_FRAME):
        raise ValueError(f"audio features are {tokens.shape}, expected [{n}, "
                         f"{TOKENS_PER_FRAME}, dim]")
    if predictor is not None:
        va = np.concatenate(emotions)
    else:
        va = tools.emotions.for_video(item.name, item.path, n)
    arrays = dict(latent=np.concatenate([np.asarray(z) for z in latents]), audio=tokens,
                  valence=np.ascontiguousarray(va[:, 0]), arousal=np.ascontiguousarray(va[:, 1]))
    if opts.store_frames:
        arrays["png"] = np.frombuffer(b"".join(pngs), np.uint8)
        arrays["png_offsets"] = np.cumsum([0] + [len(p) for p in pngs]).astype(np.int64)
    meta = dict(num_frames=n, source_fps=reader.source_fps, source_frames=reader.source_frames,
                video_duration=round(reader.duration, 6), audio_duration=round(audio.duration, 6),
                audio_source_rate=audio.source_rate, audio_source_channels=audio.source_channels,
                audio_offset_s=round(audio.start_time - reader.start_time, 6),
                crop="centre" if boxes is None else "face")
    return arrays, meta


def frame_pngs(arrays: dict[str, np.ndarray]) -> list[bytes] | None:
    """The stored PNG crops of a processed video (None when frames were not stored)."""
    if "png" not in arrays:
        return None
    data, offsets = arrays["png"], arrays["png_offsets"]
    return [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
