"""Evaluation metrics (keyface_jax.eval, keyface_jax.evaluate).

Material: two 8 s demo videos (data_pipelines.demo; seed 1 gives the second one a sigh and a
laugh), whose mouth opening follows the speech loudness. The metrics must separate what should be
separated: the real soundtrack from the same audio delayed 1 s, a still face from a talking one,
a face that rests in pauses from one that keeps talking through them, the identity from other
people (LFW faces shipped with scikit-image), and a steady clip from one that drifts.
The Fréchet distance is checked against closed forms, the JAX FID Inception against an
independent torch.nn InceptionV3 (random weights), and the FVD / LipScore code paths with small
stand-in networks, since none of the real weights can be had here.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from data_pipelines.demo.build import build_dataset
from keyface_jax.eval import faces, frechet, identity, inception, lipscore, lipsync
from keyface_jax.eval.video import analyze, load_segments
from keyface_jax.media.audio import align_to_frames, read_audio
from keyface_jax.media.video import read_frames, write_video

RATE = 16_000
HAVE_FACES = all(importlib.util.find_spec(m) for m in ("dlib", "face_recognition_models"))
needs_faces = pytest.mark.skipif(not HAVE_FACES, reason=f"face metrics: {faces.INSTALL_HINT}")


@pytest.fixture(scope="module")
def models():
    if not HAVE_FACES:
        pytest.skip(f"face metrics: {faces.INSTALL_HINT}")
    return faces.FaceModels()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evaldemo"))
    manifest = build_dataset(out, num_videos=2, seconds=8.0, size=256, seed=1)
    clips = []
    for entry in manifest["videos"]:
        path = os.path.join(out, entry["video"])
        frames, reader = read_frames(path)
        wave = align_to_frames(read_audio(path), reader.start_time, len(frames))
        clips.append(dict(path=path, frames=frames, wave=wave, segments=entry["segments"]))
    return out, manifest, clips


def other_face(index: int, size: int = 256) -> np.ndarray:
    """An LFW face from scikit-image (25×25 grey), upscaled and padded to a size×size frame."""
    import cv2
    from skimage import data

    face = (np.clip(data.lfw_subset()[index], 0, 1) * 255).astype(np.uint8)
    inner = int(size * 0.625)
    face = cv2.resize(face, (inner, inner), interpolation=cv2.INTER_CUBIC)
    pad = (size - inner) // 2
    face = cv2.copyMakeBorder(face, pad, size - inner - pad, pad, size - inner - pad,
                              cv2.BORDER_REPLICATE)
    return np.repeat(face[..., None], 3, -1)


def delayed(wave: np.ndarray, seconds: float) -> np.ndarray:
    n = int(seconds * RATE)
    return np.concatenate([np.zeros(n, np.float32), wave[:-n]])


# ------------------------------------------------------------------ lip sync

def test_lip_sync_far_above_the_one_second_shifted_audio(demo, models):
    _, _, clips = demo
    for clip in clips:
        report = analyze(clip["frames"], clip["wave"], measure_identity=False, models=models)
        assert report["face"]["frames_with_face"] == len(clip["frames"])
        sync = report["lip_sync"]
        assert sync["r"] >= 0.7 and abs(sync["lag"]) <= 1, sync
        assert sync["bar"]["passed"]
        # the built-in control and an actually delayed soundtrack agree that sync is gone
        assert sync["control"]["r"] < sync["r"] / 3
        shifted = analyze(clip["frames"], delayed(clip["wave"], 1.0), measure_identity=False,
                          models=models)["lip_sync"]
        assert shifted["r"] < sync["r"] / 3, (sync["r"], shifted["r"])
        assert not shifted["bar"]["passed"]


def test_lagged_correlation_finds_a_known_lag():
    rng = np.random.default_rng(0)
    sound = np.convolve(rng.standard_normal(300), np.ones(4) / 4, mode="same")
    mouth = np.roll(sound, 2) + 0.05 * rng.standard_normal(300)    # mouth trails by 2 frames
    out = lipsync.lagged_correlation(mouth, sound, max_lag=3)
    assert out["lag"] == 2 and out["r"] > 0.95
    assert out["r_by_lag"]["0"] < out["r"] - 0.2
    assert lipsync.pearson(np.ones(50), sound[:50]) == 0.0          # constant: no correlation


def test_keyframe_split_separates_the_two_models_sync():
    rng = np.random.default_rng(1)
    sound = rng.standard_normal(260)
    mouth = rng.standard_normal(260)          # in-between frames: unrelated to the sound
    keyframes = np.arange(260) % 13 == 0
    mouth[keyframes] = 2.0 * sound[keyframes] + 1.0   # keyframes: exactly in sync
    split = lipsync.keyframe_split(mouth, sound, stride=13)
    assert split["keyframes"] == 20 and split["inbetween"] == 240
    assert split["keyframes_r"] > 0.999 and abs(split["inbetween_r"]) < 0.2
    report = lipsync.lip_sync(mouth, sound)
    assert report["keyframe_split"] == split


@needs_faces
def test_still_face_has_no_sync_and_no_motion(demo, tmp_path, capsys):
    """A repeated single frame with the real soundtrack, through mp4 and the CLI."""
    from keyface_jax import evaluate

    _, _, clips = demo
    clip = clips[0]
    from scipy.io import wavfile

    still = np.repeat(clip["frames"][:1], len(clip["frames"]), axis=0)
    path, wav = str(tmp_path / "still.mp4"), str(tmp_path / "speech.wav")
    write_video(path, still, 25.0)
    wavfile.write(wav, RATE, (clip["wave"] * 32767).astype(np.int16))
    out = str(tmp_path / "still.json")
    assert evaluate.main(["--video", path, "--audio", wav, "--output", out,
                          "--no_identity"]) == 0
    report = json.load(open(out))
    assert abs(report["lip_sync"]["r"]) < 0.15
    assert not report["lip_sync"]["bar"]["passed"]
    assert report["mouth"]["motion_energy"] < 1e-3
    assert "lip-sync r=" in capsys.readouterr().out


def test_frames_without_a_face_are_interpolated(demo, models):
    """A 1.2 s cut to a blank frame: held box for max_track frames, then no landmarks; the
    mouth signal is interpolated over the gap and sync is still measured on the rest."""
    _, _, clips = demo
    clip = clips[0]
    frames = clip["frames"].copy()
    frames[80:110] = 128
    rep = analyze(frames, clip["wave"], measure_identity=False, max_track=5, models=models)
    face = rep["face"]
    assert face["interpolated_frames"] == 25 and face["held_box_frames"] == 5
    mouth = rep["signals"]["mouth_opening"]
    assert all(v is None for v in mouth[85:110]) and mouth[84] is not None
    assert rep["lip_sync"]["r"] > 0.5
    blank = analyze(np.full((20, 64, 64, 3), 128, np.uint8), clip["wave"][:20 * 640],
                    measure_identity=False, models=models)
    assert blank["lip_sync"]["r"] is None and "no face" in blank["lip_sync"]["note"]
    assert faces.fill_gaps(np.array([np.nan, 1.0, np.nan, 3.0, np.nan])).tolist() == \
        [1.0, 1.0, 2.0, 3.0, 3.0]


# ------------------------------------------------------------------ silence and NSVs

def test_mouth_rests_in_pauses_and_moves_in_laughter(demo, models):
    _, _, clips = demo
    speech, nsv = clips
    for clip in clips:
        rep = analyze(clip["frames"], clip["wave"], segments=clip["segments"],
                      measure_identity=False, models=models)["silence"]
        assert rep["source"] == "manifest"
        by = rep["by_label"]
        assert by["silence"]["frames"] > 0 and by["voiced"]["frames"] > 50
        assert rep["silence_to_voiced_motion"] < 0.4, rep
        assert rep["silence_to_voiced_openness"] < 0.3, rep
    by = analyze(nsv["frames"], nsv["wave"], segments=nsv["segments"], measure_identity=False,
                 models=models)["silence"]["by_label"]
    # the demo holds the mouth open through a laugh and nearly closes it in a sigh
    assert by["laugh"]["frames"] > 20 and by["sigh"]["frames"] > 10
    assert by["laugh"]["openness"] > 3 * by["silence"]["openness"]
    assert by["laugh"]["motion_energy"] > 0


def test_voiced_frames_from_loudness_match_the_manifest(demo):
    _, _, clips = demo
    for clip in clips:
        n = len(clip["frames"])
        loud = lipsync.loudness_db(clip["wave"], n)
        voiced = lipsync.voiced_from_loudness(loud)
        labels = lipsync.labels_from_segments(clip["segments"], n)
        sounding = labels != "silence"
        assert np.mean(voiced == sounding) > 0.85


def test_a_mouth_that_talks_through_silence_is_flagged(demo, models):
    """Mute the second half of the soundtrack: the mouth keeps moving in what is now silence."""
    _, _, clips = demo
    clip = clips[0]
    wave = clip["wave"].copy()
    half = len(wave) // 2
    wave[half:] = 1e-4 * np.random.default_rng(0).standard_normal(len(wave) - half)
    rep = analyze(clip["frames"], wave, measure_identity=False, models=models)
    assert rep["silence"]["source"] == "loudness"
    assert rep["silence"]["silence_to_voiced_motion"] > 0.6
    good = analyze(clip["frames"], clip["wave"], measure_identity=False, models=models)
    assert good["silence"]["silence_to_voiced_motion"] < 0.4


def test_segments_from_a_demo_manifest(demo):
    out, manifest, clips = demo
    path = os.path.join(out, "manifest.json")
    assert load_segments(path, clips[1]["path"]) == manifest["videos"][1]["segments"]
    with pytest.raises(ValueError, match="no entry"):
        load_segments(path, "elsewhere/other.mp4")


# ------------------------------------------------------------------ identity and drift

def test_identity_stays_close_to_its_own_first_frame(demo, models):
    _, _, clips = demo
    rep = analyze(clips[0]["frames"], None, identity_stride=10, models=models)["identity"]
    s = rep["summary"]
    assert s["first_similarity"] > 0.95 and s["last_similarity"] > 0.95
    assert s["passed"] and abs(s["similarity_drop"]) < 0.05
    assert [w["samples"] > 0 for w in rep["windows"]] == [True, True]
    assert all(r["distance"] < 0.4 for r in rep["samples"])
    assert s["colour_drift_delta_e"] < 2.0
    assert 0.7 < s["sharpness_last_to_first"] < 1.4


def test_identity_similarity_drops_for_other_people(demo, models):
    _, _, clips = demo
    frames = clips[0]["frames"][:30]
    for index in (0, 1):
        rep = analyze(frames, None, identity_image=other_face(index), identity_stride=10,
                      models=models)["identity"]
        s = rep["summary"]
        assert s["first_similarity"] < 0.9, s
        assert all(r["distance"] > 0.6 for r in rep["samples"])   # dlib's different-person rule


def test_drift_towards_another_face_fails_the_bar(demo, models):
    """10 s: the demo face for 5 s, then another person: the last window drops > 5 %."""
    _, _, clips = demo
    frames = clips[0]["frames"][:125]
    stranger = np.repeat(other_face(0)[None], 125, axis=0)
    rep = analyze(np.concatenate([frames, stranger]), None, identity_stride=12,
                  models=models)["identity"]
    s = rep["summary"]
    assert len(rep["windows"]) == 2
    assert s["first_similarity"] > 0.95 and s["similarity_drop"] > 0.05
    assert not s["passed"]


def test_closer_to_its_own_identity_than_to_other_faces(demo, models):
    """The demo face compared with LFW strangers: its own similarity is the highest."""
    _, _, clips = demo
    frames = clips[0]["frames"][:40]
    rep = analyze(frames, None, identity_stride=10, models=models,
                  compare_images={"lfw0": other_face(0), "lfw1": other_face(1)})["identity"]
    comp = rep["compare"]
    assert comp["own"] > 0.95 and comp["closer_to_own"]
    assert comp["nearest_other"] in ("lfw0", "lfw1")
    assert comp["nearest_other_similarity"] == max(comp["others"].values()) < 0.9
    stranger = analyze(np.repeat(other_face(0)[None], 20, axis=0), None, identity_stride=10,
                       identity_image=frames[0], models=models,
                       compare_images={"lfw0": other_face(0)})["identity"]["compare"]
    assert not stranger["closer_to_own"] and stranger["others"]["lfw0"] > 0.95


def test_sharpness_against_the_identity_image(demo, models):
    import cv2

    _, _, clips = demo
    frames = clips[0]["frames"][:40]
    same = analyze(frames, None, identity_image=frames[0], identity_stride=10,
                   models=models)["identity"]["summary"]
    blurred = [cv2.GaussianBlur(f, (0, 0), 1.5) for f in frames]
    soft = analyze(blurred, None, identity_image=frames[0], identity_stride=10,
                   models=models)["identity"]["summary"]
    assert 0.8 < same["sharpness_to_identity"] < 1.25
    assert soft["sharpness_to_identity"] < 0.5 * same["sharpness_to_identity"]


def test_identity_box_fallback_measures_faceless_frames(demo, models):
    """Frames without a detectable face are measured inside the identity image's box: every
    frame gets landmarks and every figure is finite (the demo test's 3-step models)."""
    _, _, clips = demo
    clip = clips[0]
    noise = np.random.default_rng(0).integers(0, 255, (30, 256, 256, 3), np.uint8)
    rep = analyze(noise, clip["wave"][:30 * 640], identity_image=clip["frames"][0],
                  identity_stride=10, models=models, identity_box_fallback=True)
    assert rep["face"]["fallback_box_frames"] == 30 and rep["face"]["frames_with_face"] == 30
    assert np.isfinite(rep["lip_sync"]["r"]) and np.isfinite(rep["lip_sync"]["control"]["r"])
    assert np.isfinite(rep["identity"]["summary"]["sharpness_to_identity"])
    plain = analyze(clip["frames"][:30], clip["wave"][:30 * 640], identity_image=clip["frames"][0],
                    identity_stride=10, models=models, identity_box_fallback=True)
    assert plain["face"]["fallback_box_frames"] == 0     # real faces are tracked as before


def test_colour_and_sharpness_drift_are_measured(demo, models):
    import cv2

    _, _, clips = demo
    frames = clips[0]["frames"]
    n = len(frames)
    drifted = []
    for i, f in enumerate(frames):
        k = i / (n - 1)
        tinted = np.clip(f.astype(np.float32) * [1.0 + 0.25 * k, 1.0, 1.0 - 0.25 * k], 0, 255)
        sigma = 0.3 + 2.0 * k
        drifted.append(cv2.GaussianBlur(tinted.astype(np.uint8), (0, 0), sigma))
    steady = analyze(frames, None, identity_stride=20, models=models)["identity"]["summary"]
    moved = analyze(drifted, None, identity_stride=20, models=models)["identity"]["summary"]
    assert moved["colour_drift_delta_e"] > 5 * max(steady["colour_drift_delta_e"], 1.0)
    assert moved["sharpness_last_to_first"] < 0.5 * steady["sharpness_last_to_first"]


def test_windows_merge_a_short_tail():
    rows = [dict(frame=f, similarity=1.0, distance=0.0, delta_e=0.0, sharpness=1.0,
                 lab_mean=[50, 0, 0], lab_std=[1, 1, 1]) for f in range(0, 260, 10)]
    assert len(identity.windows(rows, 260, 25.0, 5.0)) == 2        # 10.4 s: tail merged
    assert len(identity.windows(rows, 320, 25.0, 5.0)) == 3        # 12.8 s: own window


# ------------------------------------------------------------------ Fréchet distance

def _fd_sqrtm(mu1, s1, mu2, s2):
    """pytorch-fid's formula through scipy.linalg.sqrtm (an independent check)."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(covmean.real))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # diagonal: sum of (Δμ)² + (√a − √b)²
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want,
                                                                                      rel=1e-10)
    # 2×2, not commuting: tr √(Σ1Σ2) = √(tr Σ1Σ2 + 2 √(det Σ1 det Σ2))
    m1, m2 = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(2), m2 @ m2.T + 0.1 * np.eye(2)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    tr = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    want = np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet.frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(
        want, rel=1e-9)
    # scaled covariance: tr Σ (1 − √c)²
    m = rng.standard_normal((5, 5))
    s = m @ m.T
    assert frechet.frechet_distance(np.zeros(5), s, np.zeros(5), 4 * s) == pytest.approx(
        np.trace(s), rel=1e-9)
    # identical → 0; rotation invariance; a large random case against scipy's sqrtm
    assert frechet.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0,
                                                                                       abs=1e-9)
    q, _ = np.linalg.qr(rng.standard_normal((2, 2)))
    assert frechet.frechet_distance(np.zeros(2), q @ s1 @ q.T, np.zeros(2), q @ s2 @ q.T) == \
        pytest.approx(want, rel=1e-9)
    x, y = rng.standard_normal((400, 32)), 1.3 * rng.standard_normal((400, 32)) + 0.2
    stats = frechet.gaussian_stats(x) + frechet.gaussian_stats(y)
    assert frechet.frechet_distance(*stats) == pytest.approx(_fd_sqrtm(*stats), rel=1e-7)


def test_frechet_on_singular_covariances_and_statistics():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 0.5   # N < D
    mu, cov = frechet.gaussian_stats(x)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(mu, x.mean(0))
    d = frechet.frechet_from_features(x, y)
    assert np.isfinite(d) and d > 64 * 0.25 * 0.9      # at least most of |Δμ|² = 16
    assert frechet.frechet_from_features(x, x) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError):
        frechet.gaussian_stats(np.zeros((1, 4)))


def test_fid_and_fvd_drivers_with_toy_extractors():
    class Means:
        dim = 3

        def __call__(self, batch):
            return batch.reshape(len(batch), -1, 3).mean(1)

    rng = np.random.default_rng(2)
    a = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(21)]
    feats = frechet.extract(Means(), a, batch_size=4)
    np.testing.assert_allclose(feats, frechet.extract(Means(), a, batch_size=50))
    assert frechet.fid(Means(), a, a) == pytest.approx(0.0, abs=1e-6)
    b = [np.clip(x.astype(int) + 40, 0, 255).astype(np.uint8) for x in a]
    assert frechet.fid(Means(), a, b) > 1000
    clips = frechet.video_clips(np.zeros((40, 4, 4, 3), np.uint8), 16)
    assert [c.shape[0] for c in clips] == [16, 16]


def test_missing_weights_say_where_to_get_them(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(frechet.WeightsMissing, match="pytorch-fid"):
        inception.InceptionFeatures(missing)
    with pytest.raises(frechet.WeightsMissing, match="i3d_torchscript"):
        frechet.TorchScriptI3D(None)
    with pytest.raises(frechet.WeightsMissing, match="auto_avsr"):
        lipscore.TorchScriptLipEncoder(missing)


def test_cli_stops_with_a_message_when_weights_are_missing(demo, tmp_path, capsys):
    from keyface_jax import evaluate

    _, _, clips = demo
    code = evaluate.main(["--video", clips[0]["path"], "--reference", clips[1]["path"],
                          "--fid_weights", str(tmp_path / "missing.pth"), "--no_identity",
                          "--output", str(tmp_path / "m.json")])
    assert code == 2
    assert "pt_inception-2015-12-05" in capsys.readouterr().err


# ------------------------------------------------------------------ FID InceptionV3 (JAX)

def _torch_inception():
    """torchvision's InceptionV3 layout with pytorch-fid's FID patches, in plain torch.nn."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, i, o, k, s=1, p=0):
            super().__init__()
            self.conv = nn.Conv2d(i, o, k, stride=s, padding=p, bias=False)
            self.bn = nn.BatchNorm2d(o, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, i, pool):
            super().__init__()
            self.branch1x1 = Conv(i, 64, 1)
            self.branch5x5_1, self.branch5x5_2 = Conv(i, 48, 1), Conv(48, 64, 5, p=2)
            self.branch3x3dbl_1 = Conv(i, 64, 1)
            self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, p=1), Conv(96, 96, 3, p=1)
            self.branch_pool = Conv(i, pool, 1)

        def forward(self, x):
            return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                              self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              self.branch_pool(avg(x))], 1)

    class B(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.branch3x3 = Conv(i, 384, 3, s=2)
            self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(i, 64, 1), Conv(64, 96, 3, p=1)
            self.branch3x3dbl_3 = Conv(96, 96, 3, s=2)

        def forward(self, x):
            return torch.cat([self.branch3x3(x),
                              self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              F.max_pool2d(x, 3, 2)], 1)

    class C(nn.Module):
        def __init__(self, c7):
            super().__init__()
            self.branch1x1 = Conv(768, 192, 1)
            self.branch7x7_1 = Conv(768, c7, 1)
            self.branch7x7_2 = Conv(c7, c7, (1, 7), p=(0, 3))
            self.branch7x7_3 = Conv(c7, 192, (7, 1), p=(3, 0))
            self.branch7x7dbl_1 = Conv(768, c7, 1)
            self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), p=(3, 0))
            self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), p=(0, 3))
            self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), p=(3, 0))
            self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), p=(0, 3))
            self.branch_pool = Conv(768, 192, 1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for k in range(1, 6):
                d = getattr(self, f"branch7x7dbl_{k}")(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg(x))], 1)

    class D(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = Conv(768, 192, 1), Conv(192, 320, 3, s=2)
            self.branch7x7x3_1 = Conv(768, 192, 1)
            self.branch7x7x3_2 = Conv(192, 192, (1, 7), p=(0, 3))
            self.branch7x7x3_3 = Conv(192, 192, (7, 1), p=(3, 0))
            self.branch7x7x3_4 = Conv(192, 192, 3, s=2)

        def forward(self, x):
            b7 = x
            for k in range(1, 5):
                b7 = getattr(self, f"branch7x7x3_{k}")(b7)
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                              F.max_pool2d(x, 3, 2)], 1)

    class E(nn.Module):
        def __init__(self, i, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = Conv(i, 320, 1)
            self.branch3x3_1 = Conv(i, 384, 1)
            self.branch3x3_2a = Conv(384, 384, (1, 3), p=(0, 1))
            self.branch3x3_2b = Conv(384, 384, (3, 1), p=(1, 0))
            self.branch3x3dbl_1 = Conv(i, 448, 1)
            self.branch3x3dbl_2 = Conv(448, 384, 3, p=1)
            self.branch3x3dbl_3a = Conv(384, 384, (1, 3), p=(0, 1))
            self.branch3x3dbl_3b = Conv(384, 384, (3, 1), p=(1, 0))
            self.branch_pool = Conv(i, 192, 1)

        def forward(self, x):
            t = self.branch3x3_1(x)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else avg(x)
            return torch.cat([self.branch1x1(x),
                              torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1),
                              torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1),
                              self.branch_pool(pooled)], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = Conv(3, 32, 3, s=2)
            self.Conv2d_2a_3x3 = Conv(32, 32, 3)
            self.Conv2d_2b_3x3 = Conv(32, 64, 3, p=1)
            self.Conv2d_3b_1x1 = Conv(64, 80, 1)
            self.Conv2d_4a_3x3 = Conv(80, 192, 3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c = C(128), C(160)
            self.Mixed_6d, self.Mixed_6e = C(160), C(192)
            self.Mixed_7a = D()
            self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
            self.fc = nn.Linear(2048, 1008)

        def forward(self, x):   # x [B, 3, H, W] in [0, 1]
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, 2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, 2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return x.mean((2, 3))

    return Net().eval()


def test_inception_matches_an_independent_torch_network(tmp_path):
    torch = pytest.importorskip("torch")
    state = inception.random_state_dict(seed=3)
    net = _torch_inception()
    full = {k: torch.from_numpy(v) for k, v in state.items()}
    full["fc.weight"], full["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    for k, v in net.state_dict().items():          # num_batches_tracked
        full.setdefault(k, v)
    net.load_state_dict(full, strict=True)         # same key names and shapes as pytorch-fid
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 90, 120, 3), dtype=np.uint8)
    with torch.no_grad():
        want = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    # the .pth pickle path (torch) and the safetensors conversion (no torch) load the same
    pth, st = str(tmp_path / "w.pth"), str(tmp_path / "w.safetensors")
    torch.save(full, pth)
    inception.convert(pth, st)
    got = inception.InceptionFeatures(st)(images)
    assert got.shape == (2, 2048)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert np.abs(want[0] - want[1]).max() > 1e-2 * np.abs(want).max()   # inputs matter


def test_resize_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x = np.random.default_rng(5).standard_normal((1, 1, 37, 410)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=(299, 299), mode="bilinear",
                         align_corners=False).numpy()[0, 0]
    got = inception.resize_matrix(37, 299) @ x[0, 0] @ inception.resize_matrix(410, 299).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_inception_rejects_a_wrong_state_dict():
    state = inception.random_state_dict()
    del state["Mixed_6b.branch1x1.bn.bias"]
    state["Mixed_5b.branch_pool.conv.weight"] = np.zeros((33, 192, 1, 1), np.float32)
    state["aux.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="1 missing.*1 unexpected.*1 mis-shaped"):
        inception.prepare_params(state)


# ------------------------------------------------------------------ FVD and LipScore paths

def test_fvd_torchscript_path(tmp_path):
    torch = pytest.importorskip("torch")

    class FakeI3D(torch.nn.Module):
        """The StyleGAN-V detector's call signature; features = per-channel/time means."""

        def forward(self, x: torch.Tensor, rescale: bool, resize: bool,
                    return_features: bool) -> torch.Tensor:
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            y = x.float()
            if rescale:
                y = y / 127.5 - 1
            return y.mean((3, 4)).flatten(1)

    path = str(tmp_path / "i3d.pt")
    torch.jit.script(FakeI3D()).save(path)
    net = frechet.TorchScriptI3D(path)
    rng = np.random.default_rng(6)
    a = [rng.integers(0, 200, (16, 8, 8, 3), dtype=np.uint8) for _ in range(6)]
    b = [np.clip(c.astype(int) + 50, 0, 255).astype(np.uint8) for c in a]
    assert net(np.stack(a[:2])).shape == (2, 48)
    assert frechet.fvd(net, a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet.fvd(net, a, b) > 1.0


class RandomLipEncoder:
    """A fixed random projection of 8×8-pooled crops: stands in for Auto-AVSR's encoder."""

    def __init__(self, dim: int = 32, seed: int = 0):
        self.w = np.random.default_rng(seed).standard_normal((121, dim)) / 11.0

    def __call__(self, crops):
        pooled = crops.reshape(len(crops), 11, 8, 11, 8).mean((2, 4)).reshape(len(crops), -1)
        return np.tanh(pooled @ self.w)


def test_lip_score_path(demo, models, tmp_path):
    _, _, clips = demo
    a, b = clips[0]["frames"][:60], clips[1]["frames"][:60]
    enc = RandomLipEncoder()
    same = lipscore.lip_score([a], [a], enc, models)
    assert same["lip_score"] == pytest.approx(1.0, abs=1e-9)
    crops = lipscore.video_crops(a, models)
    assert crops.shape == (60, 88, 88) and abs(crops.mean()) < 3
    other = lipscore.lip_score([a, a], [b, a], enc, models)
    assert other["per_video"][0] < 0.999 and other["per_video"][1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="frame counts"):
        lipscore.lip_score([a], [b[:10]], enc, models)
    torch = pytest.importorskip("torch")

    class Enc(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:    # [1, T, 1, 88, 88]
            return x.mean((2,)).flatten(2)[..., :768]

    path = str(tmp_path / "enc.pt")
    torch.jit.script(Enc()).save(path)
    ts = lipscore.TorchScriptLipEncoder(path)
    assert ts(crops[:5]).shape == (5, 768)


@needs_faces
def test_cli_paper_metrics_with_stand_in_weights(demo, tmp_path):
    """--reference with FID (random Inception weights as safetensors), FVD and LipScore
    (TorchScript stand-ins): the whole paper-metrics path on two 24-frame videos."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    from keyface_jax import evaluate

    _, _, clips = demo
    gen, ref = str(tmp_path / "gen.mp4"), str(tmp_path / "ref.mp4")
    write_video(gen, clips[0]["frames"][:24], 25.0, audio=clips[0]["wave"][:24 * 640])
    write_video(ref, clips[1]["frames"][:24], 25.0)
    fid_w = str(tmp_path / "inception.safetensors")
    save_file(inception.random_state_dict(7), fid_w)

    class I3D(torch.nn.Module):
        def forward(self, x: torch.Tensor, rescale: bool, resize: bool,
                    return_features: bool) -> torch.Tensor:
            return x.float().mean((3, 4)).flatten(1)

    class Lips(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(2).flatten(2)[..., ::97]

    fvd_w, lip_w = str(tmp_path / "i3d.pt"), str(tmp_path / "lips.pt")
    torch.jit.script(I3D()).save(fvd_w)
    torch.jit.script(Lips()).save(lip_w)
    out = str(tmp_path / "paper.json")
    args = ["--video", gen, "--reference", ref, "--output", out, "--no_identity",
            "--fid_weights", fid_w, "--fid_every", "4", "--fvd_weights", fvd_w,
            "--lip_encoder", lip_w]
    assert evaluate.main(args) == 0
    paper = json.load(open(out))["paper_metrics"]
    assert paper["fid"] > 0 and paper["fvd"] > 0
    assert paper["fvd_clips"] == dict(frames=16, stride=8)     # 2 clips per video
    assert 0 < paper["lip_score"]["lip_score"] < 1
    assert "skipped" not in paper


def test_mouth_transform_levels_the_eyes_and_centres_the_mouth():
    pts = np.zeros((68, 2))
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts[faces.LEFT_EYE] = [-30, 0]
    pts[faces.RIGHT_EYE] = [30, 0]
    pts[faces.MOUTH] = [0, 50]
    pts = pts @ rot.T * 1.7 + [120, 90]
    m = lipscore.mouth_transform(pts)
    apply = lambda p: m[:, :2] @ p + m[:, 2]
    left, right = apply(pts[36]), apply(pts[42])
    assert abs(left[1] - right[1]) < 1e-9
    assert right[0] - left[0] == pytest.approx(lipscore.INTEROCULAR_PX)
    np.testing.assert_allclose(apply(pts[48]), [48, 48], atol=1e-9)


# ------------------------------------------------------------------ CLI

@needs_faces
def test_cli_writes_metrics_and_a_plot(demo, tmp_path):
    from keyface_jax import evaluate

    out, _, clips = demo
    from PIL import Image

    json_path, plots = str(tmp_path / "m.json"), str(tmp_path / "plots")
    face = str(tmp_path / "face.png")
    Image.fromarray(clips[1]["frames"][0]).save(face)
    code = evaluate.main(["--video", clips[1]["path"], "--manifest",
                          os.path.join(out, "manifest.json"), "--identity", face,
                          "--output", json_path, "--plots", plots, "--identity_stride", "25"])
    assert code == 0
    report = json.load(open(json_path))
    assert report["lip_sync"]["bar"]["passed"]
    assert report["silence"]["source"] == "manifest"
    assert {"laugh", "sigh", "silence", "voiced"} <= set(report["silence"]["by_label"])
    assert report["identity"]["summary"]["passed"]
    assert report["identity_source"].endswith("face.png")
    assert report["identity"]["summary"]["first_similarity"] > 0.97
    assert len(report["signals"]["mouth_opening"]) == report["num_frames"] == 200
    assert os.path.getsize(report["plot"]) > 10_000
