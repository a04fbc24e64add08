"""Video files through PyAV: probing, frames resampled to 25 fps, and writing mp4s.

Frame-rate conversion is sample-and-hold on the real presentation timestamps: output frame k
(time k/fps from the first video frame) is the last source frame shown at that time, i.e. the
last one with timestamp <= k/fps. For a constant 60 fps source this is the reference's
floor(k * 2.4) mapping (spec §6); variable frame rates and odd rates (29.97) need nothing
special. The output has floor(duration * fps) frames, duration = last timestamp + one source
frame, so it never extends past the source.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
from collections.abc import Iterator

import av
import numpy as np

from keyface_jax.media.errors import MediaError

# Timestamps in containers are rounded to their time base; a frame that is due within this many
# seconds of an output tick counts as due at the tick.
_TICK_TOLERANCE_S = 1e-4


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What the container says (metadata; decoding may find less, e.g. in a truncated file)."""

    path: str
    size_bytes: int
    width: int
    height: int
    fps: float                     # the video stream's average (or guessed) frame rate
    video_duration: float | None   # seconds, from stream or container metadata
    has_audio: bool
    audio_rate: int | None
    audio_channels: int | None
    audio_duration: float | None


def open_media(path: str | os.PathLike):
    """av.open with every failure (missing, empty, not a media file, ...) as a MediaError."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise MediaError(f"cannot stat file: {e.strerror or e}") from None
    if size == 0:
        raise MediaError("empty file (0 bytes)")
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(f"unreadable container: {_short(e)}") from None


def _short(error: Exception) -> str:
    """An FFmpeg error without the file name it repeats."""
    text = getattr(error, "strerror", None) or str(error)
    return text.split(": '")[0].strip() or type(error).__name__


def _seconds(value, time_base) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _stream_rate(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def probe(path: str | os.PathLike) -> MediaInfo:
    """Stream metadata, without decoding. Raises MediaError if there is no video stream."""
    with open_media(path) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        video = container.streams.video[0]
        container_duration = (container.duration / av.time_base) if container.duration else None
        video_duration = _seconds(video.duration, video.time_base) or container_duration
        audio = container.streams.audio[0] if container.streams.audio else None
        return MediaInfo(
            path=os.fspath(path), size_bytes=os.path.getsize(path),
            width=video.codec_context.width, height=video.codec_context.height,
            fps=_stream_rate(video) or 0.0, video_duration=video_duration,
            has_audio=audio is not None,
            audio_rate=audio.codec_context.sample_rate if audio else None,
            audio_channels=audio.codec_context.channels if audio else None,
            audio_duration=(_seconds(audio.duration, audio.time_base) or container_duration)
            if audio else None)


class FrameReader:
    """Iterates a file's first video stream as RGB uint8 frames [H, W, 3] at `fps`.

    After a complete iteration: `num_frames` (output frames), `source_frames` (decoded),
    `source_fps`, `start_time` (the first frame's time on the container timeline, seconds, for
    aligning audio) and `duration` (seconds covered from the first frame).
    """

    def __init__(self, path: str | os.PathLike, fps: float = 25.0):
        self.path = os.fspath(path)
        self.fps = float(fps)
        self.num_frames = 0
        self.source_frames = 0
        self.source_fps = 0.0
        self.start_time = 0.0
        self.duration = 0.0

    def __iter__(self) -> Iterator[np.ndarray]:
        with open_media(self.path) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            self.source_fps = _stream_rate(stream) or 0.0
            yield from self._resample(container, stream)

    def _decoded(self, container, stream) -> Iterator[tuple[float, av.VideoFrame]]:
        """(time in seconds, frame) in presentation order; decode errors become MediaError."""
        last = None
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except (av.FFmpegError, OSError) as e:
                raise MediaError(f"video decode error after {self.source_frames} frames: "
                                 f"{_short(e)}") from None
            t = frame.time
            if t is None:  # no timestamp: one nominal frame after the previous one
                t = 0.0 if last is None else last + 1.0 / (self.source_fps or self.fps)
            if last is not None and t < last:  # broken timestamps: never go back in time
                t = last
            last = t
            self.source_frames += 1
            yield t, frame

    def _resample(self, container, stream) -> Iterator[np.ndarray]:
        tick = 1.0 / self.fps
        current, current_rgb, first, rel = None, None, None, 0.0
        step = None
        for t, frame in self._decoded(container, stream):
            if first is None:
                first = t
                self.start_time = t
            new_rel = t - first
            if current is not None:
                if new_rel > rel:
                    step = new_rel - rel if step is None else min(step, new_rel - rel)
                while self.num_frames * tick + _TICK_TOLERANCE_S < new_rel:
                    if current_rgb is None:  # convert only frames that are shown
                        current_rgb = current.to_ndarray(format="rgb24")
                    yield current_rgb
                    self.num_frames += 1
            current, current_rgb, rel = frame, None, new_rel
        if current is None:
            raise MediaError("no decodable video frames")
        # The last frame lasts one source frame: nominal rate, else the smallest gap seen.
        frame_length = 1.0 / self.source_fps if self.source_fps else (step or tick)
        self.duration = rel + frame_length
        total = math.floor(self.duration * self.fps + 1e-6)
        while self.num_frames < total:
            if current_rgb is None:
                current_rgb = current.to_ndarray(format="rgb24")
            yield current_rgb
            self.num_frames += 1


def read_frames(path: str | os.PathLike, fps: float = 25.0) -> tuple[np.ndarray, FrameReader]:
    """All frames at `fps` as one uint8 array [N, H, W, 3] (small files; see FrameReader)."""
    reader = FrameReader(path, fps)
    frames = list(reader)
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8), reader


class VideoWriter:
    """Streams RGB frames into a container (mp4, mov, mkv), then muxes optional audio at close:
    memory holds one frame at a time, whatever the clip length.

        with VideoWriter(path, 25, audio=waveform) as writer:
            for chunk in chunks:
                writer.write(chunk)          # uint8 [n, H, W, 3] (H, W even for yuv420p)

    pcm_s16le audio fits in mp4 with PyAV's bundled FFmpeg (not with Debian's ffmpeg 5.1)."""

    def __init__(self, path: str | os.PathLike, fps: float, *, audio: np.ndarray | None = None,
                 audio_rate: int = 16_000, video_codec: str = "libx264", audio_codec: str = "aac",
                 crf: int | None = 18, faststart: bool = False):
        self.path = os.fspath(path)
        self._rate = fractions.Fraction(fps).limit_denominator(1001)
        self._codec, self._crf = video_codec, crf
        self._audio, self._audio_rate, self._audio_codec = audio, audio_rate, audio_codec
        options = {"movflags": "faststart"} if faststart else {}
        self._container = av.open(self.path, "w", options=options)
        self._video = None
        self.frames_written = 0

    def _open_stream(self, height: int, width: int) -> None:
        self._video = self._container.add_stream(self._codec, rate=self._rate)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        if self._crf is not None and self._codec == "libx264":
            self._video.options = {"crf": str(self._crf)}
        if self._audio is not None:  # streams must all exist before the first packet is muxed
            self._audio = np.asarray(self._audio, np.float32)
            self._audio = self._audio[:, None] if self._audio.ndim == 1 else self._audio
            layout = {1: "mono", 2: "stereo"}[self._audio.shape[1]]
            self._audio_stream = self._container.add_stream(self._audio_codec, rate=self._audio_rate,
                                                            layout=layout)

    def write(self, frames: np.ndarray) -> None:
        """uint8 frames [n, H, W, 3] (or one [H, W, 3]); every call must keep the same size."""
        frames = np.asarray(frames)
        frames = frames[None] if frames.ndim == 3 else frames
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
        if self._video is None:
            self._open_stream(frames.shape[1], frames.shape[2])
        elif (frames.shape[1], frames.shape[2]) != (self._video.height, self._video.width):
            raise ValueError(f"{self.path}: frame size {frames.shape[1:3]} differs from the stream's "
                             f"{(self._video.height, self._video.width)}")
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.frames_written, 1 / self._rate
            self._container.mux(self._video.encode(frame))
            self.frames_written += 1

    def close(self) -> None:
        if self._container is None:
            return
        try:
            if self._video is not None:
                self._container.mux(self._video.encode(None))
                if self._audio is not None:
                    _write_audio(self._container, self._audio_stream, self._audio, self._audio_rate)
        finally:
            self._container.close()
            self._container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, *,
                audio: np.ndarray | None = None, audio_rate: int = 16_000,
                video_codec: str = "libx264", audio_codec: str = "aac",
                crf: int | None = 18, faststart: bool = False) -> None:
    """Writes RGB frames [N, H, W, 3] uint8 (H, W even for yuv420p) and optional audio
    ([samples] mono or [samples, channels], float in [-1, 1]) in one go (see `VideoWriter`)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    with VideoWriter(path, fps, audio=audio, audio_rate=audio_rate, video_codec=video_codec,
                     audio_codec=audio_codec, crf=crf, faststart=faststart) as writer:
        writer.write(frames)


def _write_audio(container, stream, audio: np.ndarray, rate: int) -> None:
    fmt = stream.format.name
    layout = stream.layout.name
    clipped = np.clip(audio, -1.0, 1.0)
    for start in range(0, len(clipped), 1024):
        chunk = clipped[start:start + 1024]
        if fmt == "s16":  # packed: one row of interleaved samples
            data = np.round(chunk * 32767).astype(np.int16).reshape(1, -1)
        elif fmt == "fltp":
            data = np.ascontiguousarray(chunk.T)
        elif fmt == "flt":
            data = np.ascontiguousarray(chunk.reshape(1, -1))
        else:
            raise ValueError(f"unsupported audio sample format {fmt!r} for {stream.name}")
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, start, fractions.Fraction(1, rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
