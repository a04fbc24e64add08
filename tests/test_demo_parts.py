"""Parts of the demo job: package files, held-out recordings, face rigs from landmarks, the
autoguidance checkpoint choice, the edge loss and the report's headline figures."""

import io
import json
import math
import os
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.io import wavfile

from data_pipelines.demo import heldout, packages, photos
from data_pipelines.demo.face import FaceAnimator, FacePose
from data_pipelines.demo.timeline import SPEECH_RMS, normalise_speech_level
from keyface_jax import report
from keyface_jax.generation.runner import bad_checkpoint, bad_source
from keyface_jax.losses.reconstruction import gradient_l1


def _fake_sdist(cache, name, version, members: dict[str, bytes]):
    """A source archive as pip would leave it in the cache folder."""
    os.makedirs(cache, exist_ok=True)
    with tarfile.open(os.path.join(cache, f"{name}-{version}.tar.gz"), "w:gz") as tar:
        for rel, data in members.items():
            info = tarfile.TarInfo(f"{name}-{version}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_sdist_file_reads_a_member_from_the_cached_archive(tmp_path):
    cache = str(tmp_path / "cache")
    _fake_sdist(cache, "some_pkg", "1.2", {"data/x.bin": b"abc"})
    path = packages.sdist_file("some-pkg==1.2", "data/x.bin", cache)
    assert open(path, "rb").read() == b"abc"
    assert packages.sdist_file("some-pkg==1.2", "data/x.bin", cache) == path   # cached copy
    with pytest.raises(packages.PackageFileUnavailable, match="no member"):
        packages.sdist_file("some-pkg==1.2", "data/missing.bin", cache)
    with pytest.raises(ValueError, match="pin the version"):
        packages.sdist_file("some-pkg", "data/x.bin", cache)


def test_recording_track_is_levelled_padded_and_segmented(tmp_path):
    rate = 16000
    t = np.arange(3 * rate) / rate
    burst = (t % 1.0 < 0.5) * 0.4 * np.sin(2 * np.pi * 220 * t)       # 0.5 s on, 0.5 s off
    buffer = io.BytesIO()
    wavfile.write(buffer, rate, (burst * 32767).astype(np.int16))
    requirement, member, _ = heldout.RECORDINGS["jfk"]
    name, version = requirement.split("==")
    _fake_sdist(str(tmp_path), name, version, {member: buffer.getvalue()})
    wav, segments, source = heldout.recording_track("jfk", str(tmp_path), lead=0.5)
    assert len(wav) == 4 * rate and "Kennedy" in source
    assert np.abs(wav[:int(0.45 * rate)]).max() < 1e-3                # the lead is silent
    assert segments[0] == dict(kind="silence", start=0.0, end=0.5)
    assert [s["kind"] for s in segments].count("speech") == 3
    assert all(abs(a["end"] - b["start"]) < 1e-9 for a, b in zip(segments, segments[1:]))
    assert segments[-1]["end"] == 4.0
    voiced = wav[int(0.6 * rate):int(0.9 * rate)]
    # the training clips' level (the band-limit keeps a sine at 220 Hz)
    assert np.sqrt(np.mean(voiced ** 2)) == pytest.approx(SPEECH_RMS, rel=0.05)


def test_speech_level_counts_voiced_frames_only():
    rng = np.random.default_rng(0)
    loud = 0.3 * rng.standard_normal(16000)
    clip = np.concatenate([loud, np.zeros(48000)])          # a quarter speech, the rest silence
    out = normalise_speech_level(clip)
    assert np.sqrt(np.mean(out[:16000] ** 2)) == pytest.approx(SPEECH_RMS, rel=0.02)


def test_rig_from_landmarks_frames_the_face_and_opens_the_mouth():
    rng = np.random.default_rng(1)
    image = (rng.uniform(150, 200, (400, 300, 3))).astype(np.uint8)
    points = np.zeros((68, 2))
    points[36:42] = (120, 150)
    points[42:48] = (180, 150)                              # inter-ocular distance 60 px
    points[48], points[54] = (125, 240), (175, 240)         # mouth corners
    points[60:68] = (150, 240)
    points[8] = (150, 290)
    rig = photos.rig_from_landmarks(image, points, "test", size=128, crop_scale=4.0)
    factor = 128 / (4.0 * 60)
    assert rig.crop_size == 128 and rig.image.shape[:2] == (round(400 * factor), round(300 * factor))
    assert rig.mouth_center == pytest.approx((150 * factor, 240 * factor))
    assert rig.mouth_half_width == pytest.approx(25 * factor)
    assert rig.crop_center[0] == pytest.approx(150 * factor)
    assert 150 * factor < rig.crop_center[1] < 240 * factor   # between the eyes and the mouth
    animator = FaceAnimator(rig, 128, max_open=0.4)
    shut, wide = animator.render(FacePose()), animator.render(FacePose(mouth_open=1.0))
    mouth = (slice(60, 100), slice(44, 84))
    assert wide[mouth].mean() < shut[mouth].mean() - 5     # the open mouth is dark
    # the mouth box holds the whole dark cavity, at full opening and full width, and little else
    luma = np.array([0.299, 0.587, 0.114])
    top, bottom, left, right = animator.mouth_box()
    assert (bottom - top) * (right - left) < 0.06
    for pose in (FacePose(mouth_open=1.0), FacePose(mouth_open=1.0, mouth_wide=1.0)):
        darker = shut @ luma - animator.render(pose).astype(np.float64) @ luma > 40
        rows, cols = (np.nonzero(darker)[i] + 0.5 for i in (0, 1))
        assert darker.sum() > 100
        assert np.all((rows >= top * 128) & (rows < bottom * 128))
        assert np.all((cols >= left * 128) & (cols < right * 128))
    with pytest.raises(ValueError, match="too small"):
        photos.rig_from_landmarks(image, points * 0.05, "tiny", size=128)


def test_autoguidance_bad_checkpoint_is_a_fraction_of_training(tmp_path):
    assert bad_checkpoint([1, 100, 200, 300], 1 / 3) == 100
    assert bad_checkpoint([100, 200, 300], 2 / 3) == 200
    assert bad_checkpoint([1, 300], 1 / 3) is None          # only an untrained one nearby
    assert bad_checkpoint([300], 1 / 3) is None
    assert bad_checkpoint([1, 2, 3], 1 / 3) == 1            # a 3-step run: its step 1 is 1/3
    run = tmp_path / "run"
    for step in (1, 100, 200, 300):
        (run / "checkpoints" / str(step)).mkdir(parents=True)
    pick = lambda spec: bad_source(spec, str(run))
    assert pick("auto") == f"run:{run}@100"
    assert pick("fraction:0.66") == f"run:{run}@200"
    assert pick("step:200") == f"run:{run}@200"
    assert pick("none") is None
    assert pick("other/weights") == "other/weights"


def test_gradient_loss_by_hand():
    a = jnp.zeros((1, 4, 4, 1))
    assert float(gradient_l1(a, a)) == 0.0
    edge = a.at[:, :, 2:, :].set(1.0)                       # one vertical edge
    # 4 of the 12 horizontal differences are 1, no vertical difference is: 0.5 · 4/12
    assert float(gradient_l1(a, edge)) == pytest.approx(0.5 * 4 / 12)
    assert float(gradient_l1(a + 0.3, a)) == 0.0            # a uniform offset has no edges


def test_report_headline_and_stage_times(tmp_path):
    (tmp_path / "stages.tsv").write_text("1/8 models\t0\n2/8 videos\t40\ndone\t100\n")
    assert report.read_stage_times(str(tmp_path / "stages.tsv")) == {"models": 40,
                                                                     "videos": 60}
    evaluation = dict(lip_sync=dict(r=0.7, r_lag0=0.65, control=dict(r=0.1),
                                    keyframe_split=dict(keyframes_r=0.8, inbetween_r=0.6)),
                      face=dict(fallback_box_frames=0),
                      identity=dict(summary=dict(first_similarity=0.9, last_similarity=0.91,
                                                 sharpness_to_identity=0.5)))
    face = dict(evaluation, identity=dict(evaluation["identity"], compare=dict(
        own=0.8, others={"a": 0.7}, nearest_other="a", nearest_other_similarity=0.7)))
    out = report.headline(dict(evaluation=evaluation, evaluations={"face": face},
                               autoencoder_unseen=dict(psnr=27.0, sharpness_ratio=0.4),
                               stage_seconds={"models": 40}))
    assert out["lip_sync_r_lag0"] == 0.65 and out["lip_sync_control_r"] == 0.1
    assert out["lip_sync_r_keyframes"] == 0.8 and out["lip_sync_r_inbetween"] == 0.6
    assert out["face_similarity_to_own_input"] == 0.8
    assert out["face_similarity_to_nearest_other"] == 0.7
    assert out["autoencoder_psnr_unseen"] == 27.0 and out["seconds_models"] == 40
    assert all(isinstance(v, float | int) and math.isfinite(v) for v in out.values())
    json.dumps(out)
