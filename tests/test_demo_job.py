"""The main job (`launch/demo.sh`) end to end, shortened: few training steps, 2 demo videos and 3-s
clips, the same stages and code path; the files exist and every figure of metrics.json is there
and finite."""

import json
import math
import os
import subprocess
import sys

from scipy.io import wavfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _non_finite(tree, path=""):
    """Paths of NaN / infinite numbers anywhere in a JSON tree."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _non_finite(value, f"{path}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _non_finite(value, f"{path}/{i}")
    elif isinstance(tree, float) and not math.isfinite(tree):
        yield path


def test_demo_job_runs_end_to_end_and_resumes(tmp_path):
    env = dict(os.environ, KEYFACE_DEMO_DIR=str(tmp_path / "demo"), DEMO_SKIP_SETUP="1", DEMO_DESCRIBE="0",
               DEMO_STEPS="3", DEMO_AE_STEPS="3", DEMO_SECONDS="3", DEMO_VIDEOS="2", DEMO_CLIP_SECONDS="3",
               TQDM_DISABLE="1",
               JAX_PLATFORMS="cpu", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)   # one CPU device, as a user's machine
    run = lambda: subprocess.run(["bash", os.path.join(ROOT, "launch", "demo.sh")], env=env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=1500)
    proc = run()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = tmp_path / "demo"
    for name in ("generated/heldout.mp4", "heldout/speech.wav", "report/contact_sheet.png",
                 "report/losses.png", "report/metrics.json", "runs/autoencoder/export"):
        assert (out / name).exists(), name
    report = json.loads((out / "report" / "metrics.json").read_text())
    # every headline figure is there and finite, even from 3-step models (faces are measured in
    # the identity image's box where dlib finds none: report.face.fallback_box_frames says so)
    summary = report["summary"]
    for clip in ("", "jfk_", "heldout_face_"):
        for key in ("lip_sync_r_lag0", "lip_sync_r", "lip_sync_control_r", "identity_first_window",
                    "identity_last_window", "sharpness_to_input"):
            assert clip + key in summary, clip + key
    for key in ("heldout_face_similarity_to_own_input", "heldout_face_similarity_to_nearest_other",
                "autoencoder_psnr_unseen", "autoencoder_sharpness_unseen",
                "autoencoder_psnr_training_frames", "keyframe_last_loss", "interpolation_last_loss",
                "seconds_autoencoder", "seconds_generation"):
        assert key in summary, key
    bad = {k: v for k, v in summary.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
    assert not bad, bad
    assert not list(_non_finite(report)), list(_non_finite(report))
    assert report["evaluation"]["identity_source"].endswith("heldout.identity.png")
    assert set(report["evaluations"]) == {"jfk", "heldout_face"}
    assert set(report["training"]["runs"]) == {"autoencoder", "keyframe", "interpolation"}
    for name in ("jfk", "heldout_face"):
        assert (out / "generated" / f"{name}.mp4").exists(), name
    rate, wav = wavfile.read(out / "heldout" / "speech.wav")
    assert rate == 16000 and len(wav) >= 3 * rate                   # at least DEMO_SECONDS
    assert report["contact_sheet"]["video_frames"] == math.ceil(len(wav) / 640)   # 25 fps, audio length
    # re-running resumes: finished stages are kept (the video is not generated again)
    before = (out / "generated" / "heldout.mp4").stat().st_mtime_ns
    proc = run()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "generated" / "heldout.mp4").stat().st_mtime_ns == before
