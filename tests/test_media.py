"""keyface_jax.media: 25 fps resampling, 16 kHz mono audio, alignment, face-crop boxes, errors."""

import fractions

import av
import numpy as np
import pytest

from keyface_jax.data.schema import resampled_length, source_frame_index
from keyface_jax.media import face_crop
from keyface_jax.media.audio import Audio, align_to_frames, peak_dbfs, read_audio, resample
from keyface_jax.media.errors import MediaError
from keyface_jax.media.video import FrameReader, probe, read_frames, write_video

H, W = 48, 64


def coded_frames(n: int) -> np.ndarray:
    """Frame k shows k in binary: 8 vertical stripes of 8 px, white where the bit is set."""
    frames = np.zeros((n, H, W, 3), np.uint8)
    for k in range(n):
        for b in range(8):
            if (k >> b) & 1:
                frames[k, :, 8 * b:8 * b + 8] = 255
    return frames


def decode_index(frames: np.ndarray, width: int = W) -> np.ndarray:
    centres = ((np.arange(8) + 0.5) * width / 8).astype(int)
    bits = frames[:, frames.shape[1] // 2][:, centres, 0] > 127
    return (bits * (1 << np.arange(8))).sum(axis=1)


@pytest.mark.parametrize("fps", [30, 60, 24, 25])
def test_frames_resampled_to_25fps(tmp_path, fps):
    n = 2 * fps
    path = tmp_path / f"v{fps}.mp4"
    write_video(path, coded_frames(n), fps)
    frames, reader = read_frames(path)
    assert reader.source_frames == n and reader.source_fps == fps
    assert len(frames) == reader.num_frames == resampled_length(n, fps) == 50
    want = [source_frame_index(k, fps) for k in range(len(frames))]
    np.testing.assert_array_equal(decode_index(frames), want)


def test_variable_frame_rate_is_sample_and_hold(tmp_path):
    times = [0.0, 0.1, 0.15, 0.3, 0.31, 0.32, 0.5]  # seconds; last frame lasts 1/fps nominal
    path = str(tmp_path / "vfr.mkv")
    frames = coded_frames(len(times))
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=100)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = fractions.Fraction(1, 1000)
        for k, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(frames[k], format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    out, reader = read_frames(path)
    ticks = np.arange(len(out)) / 25
    want = [max(i for i, t in enumerate(times) if t <= tick + 1e-9) for tick in ticks]
    np.testing.assert_array_equal(decode_index(out), want)
    assert reader.source_frames == len(times)


def _click_track(rate: int, seconds: float, click_s: float, channels: int) -> np.ndarray:
    wave = np.zeros((int(rate * seconds), channels), np.float32)
    wave[round(click_s * rate)] = 0.9
    return wave


@pytest.mark.parametrize("rate,channels,codec", [(44_100, 2, "aac"), (16_000, 1, "pcm_s16le"),
                                                 (48_000, 2, "pcm_s16le")])
def test_audio_16k_mono_keeps_onsets(tmp_path, rate, channels, codec):
    path = tmp_path / "a.mp4"
    write_video(path, coded_frames(50), 25, audio=_click_track(rate, 2.0, 0.73, channels),
                audio_rate=rate, audio_codec=codec)
    info = probe(path)
    assert (info.audio_rate, info.audio_channels) == (rate, channels)
    audio = read_audio(path)
    assert audio.rate == 16_000 and audio.waveform.dtype == np.float32
    assert (audio.source_rate, audio.source_channels) == (rate, channels)
    assert abs(int(np.argmax(np.abs(audio.waveform))) - round(0.73 * 16_000)) <= 1
    assert abs(audio.duration - 2.0) < 0.05  # AAC pads to whole 1024-sample frames


def test_downmix_is_channel_mean(tmp_path):
    rate, n = 16_000, 16_000
    tone = np.sin(2 * np.pi * 200 * np.arange(n) / rate).astype(np.float32)
    stereo = np.stack([0.6 * tone, 0.2 * tone], axis=1)
    path = tmp_path / "s.mp4"
    write_video(path, coded_frames(25), 25, audio=stereo, audio_rate=rate, audio_codec="pcm_s16le")
    audio = read_audio(path)
    np.testing.assert_allclose(audio.waveform[:n], 0.4 * tone, atol=2e-4)


def test_align_to_frames_offsets_and_length():
    wave = np.arange(1, 1001, dtype=np.float32)
    late = Audio(wave, 1000, start_time=0.1, source_rate=1000, source_channels=1)
    out = align_to_frames(late, video_start=0.0, num_frames=30, fps=25)
    assert len(out) == 1200 and np.all(out[:100] == 0) and out[100] == 1 and np.all(out[1100:] == 0)
    early = Audio(wave, 1000, start_time=0.0, source_rate=1000, source_channels=1)
    out = align_to_frames(early, video_start=0.2, num_frames=10, fps=25)
    assert len(out) == 400 and out[0] == 201 and out[-1] == 600


def test_resample_and_peak():
    x = np.sin(2 * np.pi * 440 * np.arange(44_100) / 44_100)
    y = resample(x, 44_100, 16_000)
    assert len(y) == 16_000 and y.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1
    assert peak_dbfs(np.zeros(10)) == -np.inf and abs(peak_dbfs(np.array([0.1])) + 20) < 1e-9


def test_unusable_files_raise_media_error(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    silent_video = tmp_path / "noaudio.mp4"
    write_video(silent_video, coded_frames(10), 25)
    with pytest.raises(MediaError, match="empty file"):
        probe(empty)
    with pytest.raises(MediaError, match="unreadable container"):
        list(FrameReader(junk))
    with pytest.raises(MediaError, match="cannot stat"):
        probe(tmp_path / "missing.mp4")
    with pytest.raises(MediaError, match="no audio stream"):
        read_audio(silent_video)


def test_smooth_boxes_interpolates_smooths_and_stays_inside():
    faces = [None] * 40
    for k in range(0, 40, 5):
        faces[k] = np.array([40.0 + k, 30.0, 20.0, 20.0])
    faces[10] = None  # a missed detection
    boxes = face_crop.smooth_boxes(faces, 100, 160, scale=2.0, sigma=2.0, detected_frames=8)
    assert boxes.shape == (40, 3)
    np.testing.assert_allclose(boxes[:, 2], 40.0)
    assert np.all(np.diff(boxes[:, 0]) >= -1e-9)  # centre moves monotonically, no jumps
    assert np.all(np.abs(np.diff(boxes[:, 0])) < 1.5)
    assert np.all(boxes[:, 0] - boxes[:, 2] / 2 >= 0) and np.all(boxes[:, 1] - boxes[:, 2] / 2 >= 0)
    corner = face_crop.smooth_boxes([np.array([0.0, 0.0, 30.0, 30.0])], 50, 80, scale=3.0)
    np.testing.assert_allclose(corner[0], [25.0, 25.0, 50.0])  # shrunk to 50, moved inside
    fixed = face_crop.smooth_boxes(faces, 100, 160, scale=2.0, sigma=np.inf, detected_frames=8)
    assert np.all(fixed == fixed[0])
    with pytest.raises(MediaError, match="no face"):
        face_crop.smooth_boxes([None] * 10, 100, 160)


def test_track_faces_follows_overlap_then_crop():
    a, b = np.array([0.0, 0.0, 30.0, 30.0]), np.array([50.0, 50.0, 40.0, 40.0])
    tracked = face_crop.track_faces([np.stack([a]), np.stack([b * 0 + [2, 2, 30, 30], b]), None])
    np.testing.assert_array_equal(tracked[1], [2, 2, 30, 30])  # overlaps the last face: kept
    assert tracked[2] is None
    frame = np.zeros((60, 80, 3), np.uint8)
    frame[:, 40:] = 255
    crop = face_crop.crop_resize(frame, face_crop.centre_box(60, 80), 32)
    assert crop.shape == (32, 32, 3) and crop[:, :8].max() == 0 and crop[:, -8:].min() == 255


def test_haar_detector_on_a_blank_frame():
    pytest.importorskip("cv2")
    detector = face_crop.make_detector("haar")
    assert detector(np.zeros((120, 160, 3), np.uint8)).shape == (0, 4)
    assert face_crop.make_detector("centre") is None
