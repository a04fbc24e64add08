"""The main job as the README writes it, `bash launch/demo.sh`, from the root of a copy of the
repository with the default relative output folder (outputs/demo), shortened only through the
script's documented variables: few training steps, 2 demo videos, 3 s of held-out speech. Then,
as after an interruption at the generation stage, the video is removed and the job re-run with
the output folder given as an absolute path: every finished stage is skipped (training without
compiling), the dataset is reused, the video is made again and the report rewritten. Every
figure of metrics.json's summary is there and finite."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from scipy.io import wavfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a clone would not hold: build outputs, caches, the virtualenv
LEFT_OUT = shutil.ignore_patterns(".git", ".venv", "outputs", ".pytest_cache", "__pycache__",
                                  "*.egg-info")


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


def _run(clone, **env_overrides):
    base = {k: v for k, v in os.environ.items() if k not in ("KEYFACE_DEMO_DIR", "XLA_FLAGS")}
    env = dict(base, DEMO_SKIP_SETUP="1", DEMO_DESCRIBE="0", DEMO_STEPS="3", DEMO_AE_STEPS="3",
               DEMO_SECONDS="3", DEMO_VIDEOS="2", DEMO_CLIP_SECONDS="3", TQDM_DISABLE="1", JAX_PLATFORMS="cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=str(clone),
               JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_overrides)
    # no XLA_FLAGS: one CPU device, as on a user's machine
    return subprocess.run(["bash", "launch/demo.sh"], env=env, cwd=clone, capture_output=True,
                          text=True, timeout=1500)


def test_demo_job_from_a_clone_runs_end_to_end_and_resumes(tmp_path):
    clone = tmp_path / "keyface-jax"
    shutil.copytree(ROOT, clone, ignore=LEFT_OUT)
    # DEMO_KEYFRAME_ARGS reaches the keyframe trainer only (a logging flag: the same code path)
    proc = _run(clone, DEMO_KEYFRAME_ARGS="--config.train.log_every=1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = clone / "outputs" / "demo"
    logs = {kind: [json.loads(line) for line in
                   (out / "runs" / kind / "metrics.jsonl").read_text().splitlines()]
            for kind in ("keyframe", "interpolation")}
    assert [m["step"] for m in logs["keyframe"]] == [1, 2, 3]
    assert [m["step"] for m in logs["interpolation"]] == [3]
    # DEMO_INTERPOLATION_LR's 6e-4 against the config's 3e-4 (the same warm-up fraction at step 3)
    assert logs["interpolation"][-1]["lr"] == pytest.approx(2 * logs["keyframe"][-1]["lr"])
    for name in ("generated/heldout.mp4", "heldout/speech.wav", "report/contact_sheet.png",
                 "report/losses.png", "report/metrics.json", "runs/autoencoder/export"):
        assert (out / name).exists(), name
    # a readable console: stage lines and results, not the libraries' INFO chatter or tracebacks
    assert "Traceback" not in proc.stderr and "DatasetIterator" not in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if "orbax" in line.lower()]
    assert "Metadata file does not exist" not in proc.stderr
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
    # the guidance the demo sampled with is on record (benchmarks/demo_guidance.py reuses it)
    assert report["sampling"] == json.loads((out / "sampling.json").read_text()) == {
        "audio_scale": 3, "ref_scale": 1, "autoguidance_scale": 3,
        "keyframe_autoguidance_scale": 2, "keyframe_bad": "none"}
    assert set(report["training"]["runs"]) == {"autoencoder", "keyframe", "interpolation"}
    for name in ("jfk", "heldout_face"):
        assert (out / "generated" / f"{name}.mp4").exists(), name
    rate, wav = wavfile.read(out / "heldout" / "speech.wav")
    assert rate == 16000 and len(wav) >= 3 * rate                   # at least DEMO_SECONDS
    assert report["contact_sheet"]["video_frames"] == math.ceil(len(wav) / 640)   # 25 fps, audio length

    # Interrupted at generation, re-run with the output folder as an absolute path.
    checkpoints = sorted(p.name for p in (out / "runs" / "keyframe" / "checkpoints").iterdir())
    (out / "generated" / "heldout.mp4").unlink()
    proc = _run(clone, KEYFACE_DEMO_DIR=str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("already trained to step") == 3, proc.stdout   # no compile, no step
    assert (out / "generated" / "heldout.mp4").exists()
    assert sorted(p.name for p in (out / "runs" / "keyframe" / "checkpoints").iterdir()) == checkpoints
