"""Offline demo dataset (data_pipelines/demo): decodable mp4s, lips that follow the audio, NSVs."""

import filecmp
import json
import os

import av
import numpy as np
import pytest

from data_pipelines.demo import EMOTION_FORMAT, MANIFEST_FORMAT
from data_pipelines.demo.build import build_dataset, main
from data_pipelines.demo.timeline import plan_segments
from keyface_jax.audio import get_extractor, load_audio_16k_mono

SIZE = 128


def _decode(path):
    with av.open(path) as c:
        vs, aus = c.streams.video[0], c.streams.audio[0]
        info = dict(fps=float(vs.average_rate), width=vs.codec_context.width,
                    height=vs.codec_context.height, audio_rate=aus.rate,
                    channels=aus.codec_context.channels, audio_codec=aus.codec_context.name)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    with av.open(path) as c:
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    if audio.dtype == np.int16:
        audio = audio / 32768.0
    return info, frames, audio.astype(np.float64)


def _mouth_darkness(frames):
    """Share of dark pixels in a box around the mouth (the open mouth is the only dark thing)."""
    s = frames.shape[1] / 256
    box = frames[:, int(140 * s):int(190 * s), int(93 * s):int(163 * s)].astype(np.float64)
    luma = box @ np.array([0.299, 0.587, 0.114])
    return (luma < 90).mean(axis=(1, 2))


def _json(path):
    with open(path) as f:
        return json.load(f)


def _frame_rms(audio, rate, fps, n):
    edges = np.round(np.arange(n + 1) * rate / fps).astype(int)
    return np.array([np.sqrt(np.mean(audio[a:b] ** 2) + 1e-12) for a, b in zip(edges, edges[1:])])


def _flatness(x):
    """In-band (150–3400 Hz) spectral flatness of the louder half of 32 ms frames."""
    n = len(x) // 512
    p = np.abs(np.fft.rfft(x[:n * 512].reshape(n, 512) * np.hanning(512), axis=1)) ** 2 + 1e-12
    f = np.fft.rfftfreq(512, 1 / 16000)
    p = p[:, (f > 150) & (f < 3400)]
    e = p.sum(axis=1)
    keep = e >= np.median(e)
    return float((np.exp(np.log(p).mean(axis=1)) / p.mean(axis=1))[keep].mean())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    manifest = build_dataset(out, num_videos=2, seconds=4.0, size=SIZE, seed=0)
    return out, manifest


@pytest.fixture(scope="module")
def babble30(tmp_path_factory):
    """The fallback path: procedural speech, 30 fps, PCM audio at 16 kHz."""
    out = str(tmp_path_factory.mktemp("babble"))
    manifest = build_dataset(out, num_videos=1, seconds=3.0, size=SIZE, fps=30, seed=1,
                             audio_rate=16000, nsv_fraction=1.0, audio_codec="pcm", babble=True)
    return out, manifest


def test_manifest_and_emotion_files(dataset):
    out, manifest = dataset
    assert _json(os.path.join(out, "manifest.json")) == manifest
    assert manifest["format"] == MANIFEST_FORMAT and manifest["emotion_fps"] == 25
    assert [v["group"] for v in manifest["videos"]] == ["speech", "nsv"]
    top, bottom, left, right = manifest["mouth_box"]        # holds every video's mouth box
    for t, b, l, r in (v["mouth_box"] for v in manifest["videos"]):
        assert top <= t < b <= bottom and left <= l < r <= right
    assert 0.5 < top and bottom < 1 and 0.2 < left < right < 0.8   # the lower middle of the frame
    for v in manifest["videos"]:
        segs = v["segments"]
        assert segs[0]["start"] == 0 and abs(segs[-1]["end"] - v["duration"]) < 1e-3
        assert all(abs(a["end"] - b["start"]) < 1e-3 for a, b in zip(segs, segs[1:]))
        assert {s["kind"] for s in segs} <= {"silence", "speech", "laugh", "sigh"}
        assert all(s["source"]["end"] > s["source"]["start"] for s in segs if s["kind"] == "speech")
        emo = _json(os.path.join(out, v["emotion"]))
        assert emo["format"] == EMOTION_FORMAT and emo["fps"] == 25
        assert emo["num_frames"] == v["num_frames_25fps"] == round(v["duration"] * 25)
        for key in ("valence", "arousal"):
            values = np.array(emo[key])
            assert values.shape == (emo["num_frames"],) and np.all(np.abs(values) <= 1)
            assert values.std() > 0.01       # labels move with the content


def test_emotion_files_read_by_the_preparation(dataset):
    emotions = pytest.importorskip("data_pipelines.emotions")
    out, manifest = dataset
    reader = emotions.EmotionFiles(os.path.join(out, "emotions"))
    for v in manifest["videos"]:
        emo = _json(os.path.join(out, v["emotion"]))
        got = reader.for_video(v["name"], os.path.join(out, v["video"]), v["num_frames_25fps"])
        np.testing.assert_allclose(got, np.stack([emo["valence"], emo["arousal"]], -1), atol=1e-6)


@pytest.mark.parametrize("which", ["dataset", "babble30"])
def test_videos_decode_consistently(which, request):
    out, manifest = request.getfixturevalue(which)
    for v in manifest["videos"]:
        info, frames, audio = _decode(os.path.join(out, v["video"]))
        assert info["fps"] == v["fps"] and frames.shape == (v["num_frames"], SIZE, SIZE, 3)
        assert info["width"] == info["height"] == SIZE
        assert info["audio_rate"] == v["audio_rate"] and info["channels"] == 1
        audio_seconds = audio.size / info["audio_rate"]
        # AAC pads its last 1024-sample packet; PCM is exact
        slack = 1024 / info["audio_rate"] if info["audio_codec"] == "aac" else 1e-9
        assert v["duration"] - 1e-6 <= audio_seconds <= v["duration"] + slack
        assert abs(v["num_frames"] / v["fps"] - v["duration"]) < 1e-6
    if which == "babble30":
        assert info["audio_codec"] == "pcm_s16le" and manifest["speech_source"] == "babble"


@pytest.mark.parametrize("which", ["dataset", "babble30"])
def test_mouth_opening_follows_audio(which, request):
    out, manifest = request.getfixturevalue(which)
    for v in manifest["videos"]:
        info, frames, audio = _decode(os.path.join(out, v["video"]))
        dark = _mouth_darkness(frames)
        rms = _frame_rms(audio, info["audio_rate"], v["fps"], v["num_frames"])
        r = np.corrcoef(dark, rms)[0, 1]
        assert r > 0.5, f"{v['name']}: mouth/audio correlation {r:.2f}"
        # in sync: shifting the audio by one or two frames either way only lowers the match
        n = dark.size
        for lag in (-2, -1, 1, 2):
            a, b = dark[max(0, lag):n + min(0, lag)], rms[max(0, -lag):n - max(0, lag)]
            assert np.corrcoef(a, b)[0, 1] < r
        # silence keeps the mouth shut: frames well inside pauses are not darker than closed lips
        quiet = rms < np.percentile(rms, 15)
        assert dark[quiet].mean() < dark[~quiet].mean()


def test_nsv_segments_sound_unlike_speech(dataset, babble30):
    flat = {"speech": [], "nsv": []}
    for out, manifest in (dataset, babble30):
        for v in manifest["videos"]:
            kinds = {s["kind"] for s in v["segments"]}
            if v["group"] == "nsv":
                assert v["nsv"] and kinds & {"laugh", "sigh"}
            else:
                assert not v["nsv"] and not kinds & {"laugh", "sigh"}
            wav = load_audio_16k_mono(os.path.join(out, v["video"]))
            for s in v["segments"]:
                if s["kind"] != "silence" and s["end"] - s["start"] > 0.3:
                    part = wav[int(s["start"] * 16000):int(s["end"] * 16000)]
                    flat["speech" if s["kind"] == "speech" else "nsv"].append(_flatness(part))
    assert flat["nsv"] and flat["speech"]
    # breathy, noisy NSVs vs harmonic speech, in the same recording band
    assert min(flat["nsv"]) > max(flat["speech"])
    assert min(flat["nsv"]) > 2.5 * np.median(flat["speech"])


def test_emotion_labels_track_nsvs(tmp_path):
    manifest = build_dataset(str(tmp_path), num_videos=3, seconds=3.0, size=64, seed=5,
                             nsv_fraction=1.0)
    laughs, sighs = [], []
    for v in manifest["videos"]:
        emo = _json(tmp_path / v["emotion"])
        valence = np.array(emo["valence"])
        for s in v["nsv"]:
            mid = (s["start_frame"] + s["end_frame"]) // 2
            (laughs if s["kind"] == "laugh" else sighs).append(valence[mid])
    assert laughs or sighs
    assert all(x > 0.45 for x in laughs) and all(x < 0 for x in sighs)


def test_features_of_a_demo_video(dataset):
    out, manifest = dataset
    v = manifest["videos"][1]
    wav = load_audio_16k_mono(os.path.join(out, v["video"]))
    tokens = get_extractor("logmel")(wav, v["num_frames_25fps"])
    assert tokens.shape == (v["num_frames_25fps"], 2, 240)
    level = tokens[..., :80].mean(axis=(1, 2))
    silent = [s for s in v["segments"]
              if s["kind"] == "silence" and s["end_frame"] - s["start_frame"] > 4]
    voiced = [s for s in v["segments"] if s["kind"] != "silence"]
    quiet = np.mean([level[s["start_frame"] + 1:s["end_frame"] - 1].mean() for s in silent])
    loud = np.mean([level[s["start_frame"]:s["end_frame"]].mean() for s in voiced])
    assert loud > quiet + 0.5


def test_deterministic_by_seed_through_the_cli(tmp_path, capsys):
    args = ["--num_videos", "1", "--seconds", "1.5", "--size", "64", "--nsv_fraction", "1"]
    main(["--output", str(tmp_path / "a"), "--seed", "7"] + args)
    main(["--output", str(tmp_path / "b"), "--seed", "7"] + args)
    main(["--output", str(tmp_path / "c"), "--seed", "8"] + args)
    assert "wrote 1 videos" in capsys.readouterr().out
    for rel in ("manifest.json", "videos/demo_0000.mp4", "emotions/demo_0000.json"):
        assert filecmp.cmp(tmp_path / "a" / rel, tmp_path / "b" / rel, shallow=False), rel
    assert not filecmp.cmp(tmp_path / "a" / "videos/demo_0000.mp4",
                           tmp_path / "c" / "videos/demo_0000.mp4", shallow=False)


def test_segment_plans_tile_the_video():
    for seconds in (1.0, 2.5, 4.0, 9.0):
        for group in ("speech", "nsv"):
            for seed in range(10):
                segs = plan_segments(seconds, group, np.random.default_rng(seed))
                assert segs[0].start == 0 and abs(segs[-1].end - seconds) < 1e-9
                assert all(abs(a.end - b.start) < 1e-9 for a, b in zip(segs, segs[1:]))
                has_nsv = any(s.kind in ("laugh", "sigh") for s in segs)
                assert has_nsv == (group == "nsv")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        build_dataset(str(tmp_path), num_videos=0)
    with pytest.raises(ValueError):
        build_dataset(str(tmp_path), size=101)
    with pytest.raises(ValueError, match="nsv_fraction"):
        build_dataset(str(tmp_path), nsv_fraction=1.5)
    with pytest.raises(ValueError, match="head_motion"):
        build_dataset(str(tmp_path), head_motion=-0.5)


def test_head_motion_scales_only_the_random_drift():
    """head_motion scales the random drift: 0 leaves a speech-only video's head still but for the
    nod on loud speech; mouth, blinks and smile are the same whatever the scale."""
    from data_pipelines.demo.timeline import emotion_track, frame_audio_stats, frame_controls, render_audio
    rng = np.random.default_rng(3)
    segments = plan_segments(6.0, "speech", rng)
    wav = render_audio(segments, 6.0, None, rng)
    db25, _ = frame_audio_stats(wav, 25.0, 150)
    valence, arousal = emotion_track(segments, db25, rng)
    state = rng.bit_generator.state

    def poses(scale):
        rng.bit_generator.state = state   # the same draws for every scale
        return frame_controls(segments, wav, 25.0, 150, valence, arousal, rng, head_motion=scale)

    full, half, still = poses(1.0), poses(0.5), poses(0.0)
    rotation = lambda ps: np.array([p.rotation for p in ps])
    assert np.abs(rotation(full)).max() > 0.5                       # degrees of drift
    np.testing.assert_allclose(rotation(half), 0.5 * rotation(full), atol=1e-9)
    assert not rotation(still).any() and not any(p.shift_x for p in still)
    assert all(p.scale == 1.0 for p in still)
    for field in ("mouth_open", "mouth_wide", "blink", "smile"):
        assert [getattr(p, field) for p in still] == [getattr(p, field) for p in full], field
