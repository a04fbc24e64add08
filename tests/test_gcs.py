"""gs:// wherever a local path works, against a real GCS JSON API on loopback
(`gcp-storage-emulator`, tests/gcs_emulator.py):

- a tiny training run with workdir gs://bucket/... saves, is killed with SIGKILL, resumes, and its
  losses are bitwise those of an uninterrupted run; TensorBoard and metrics.jsonl land there too;
- `convert` writes safetensors and Orbax exports to gs:// that load back bit-exactly;
- `generate` reads its run and inputs from gs:// and writes the mp4 and summary.json there.
Datasets are the exception (ArrayRecord reads and writes local files only): see launch/tpu_pod.sh.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from tests.gcs_emulator import BUCKET, running_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")
# tests/test_train.py's run settings: the step compiles once for both (persistent cache).
TRAIN = ["--config=configs/keyframe.py:tiny,frames=4", "--config.data.path=synthetic",
         "--config.train.log_every=1", "--config.train.checkpoint_every=3",
         "--config.train.keep_checkpoints=3", "--config.train.steps=9"]


@pytest.fixture(scope="module")
def gcs():
    with running_emulator() as env:
        yield env


def _env(gcs) -> dict:
    return dict(os.environ, **gcs, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TQDM_DISABLE="1",
                JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                XLA_FLAGS="--xla_force_host_platform_device_count=4")


def _run(gcs, *args, timeout=900):
    proc = subprocess.run([sys.executable, "-m", *args], env=_env(gcs), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(workdir: str) -> dict[int, float]:
    out = {}
    for line in epath.Path(workdir, "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def reference_run(gcs):
    workdir = f"gs://{BUCKET}/reference"
    _run(gcs, "keyface_jax.train", *TRAIN, f"--workdir={workdir}")
    return workdir


def test_training_on_gcs_is_killed_resumes_and_matches_bitwise(gcs, reference_run):
    reference = _losses(reference_run)
    assert sorted(reference) == list(range(1, 10))
    assert any(p.name.startswith("events.out.tfevents")
               for p in epath.Path(reference_run, "tensorboard").iterdir())
    workdir = f"gs://{BUCKET}/killed"
    proc = subprocess.Popen([sys.executable, "-m", "keyface_jax.train", *TRAIN, f"--workdir={workdir}"],
                            env=_env(gcs), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    committed = epath.Path(workdir, "checkpoints", "3", "commit_success.txt")
    deadline = time.time() + 600
    while proc.poll() is None and not committed.exists() and time.time() < deadline:
        time.sleep(0.3)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _run(gcs, "keyface_jax.train", *TRAIN, f"--workdir={workdir}")
    resumed = _losses(workdir)
    assert 9 in resumed and min(resumed) <= 4
    assert {s: reference[s] for s in resumed} == resumed      # exact float equality


def test_convert_writes_safetensors_and_orbax_to_gcs(gcs, tmp_path):
    from flax import nnx

    from keyface_jax.conversion import io, keyface_ckpt
    from tests.helpers import tiny_network
    network, _ = tiny_network("keyframe", seed=3)
    source = tmp_path / "export"
    io.save_orbax(source, {"network": nnx.state(network, nnx.Param).to_pure_dict()})
    want = keyface_ckpt.export_reference_state_dict(network)
    for output in (f"gs://{BUCKET}/converted/keyframe.safetensors",
                   f"gs://{BUCKET}/converted/keyframe_orbax"):
        _run(gcs, "keyface_jax.convert", "--config", "configs/keyframe.py:tiny", "--source",
             "orbax", "--input", str(source), "--output", output, "--no-vae")
    got = io.read_state_dict(f"gs://{BUCKET}/converted/keyframe.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    restored = io.restore_orbax(f"gs://{BUCKET}/converted/keyframe_orbax")["network"]
    expected = nnx.state(network, nnx.Param).to_pure_dict()
    import jax
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                                 jax.tree_util.tree_flatten_with_path(expected)[0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_generate_reads_from_gcs_and_writes_there(gcs, reference_run, tmp_path):
    from keyface_jax.media.video import probe
    from keyface_jax.paths import local_copy
    from keyface_jax.testing.media import write_face, write_speech
    inputs = epath.Path(f"gs://{BUCKET}/inputs")
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "face.png").write_bytes(open(write_face(tmp_path / "face.png"), "rb").read())
    (inputs / "speech.wav").write_bytes(open(write_speech(tmp_path / "s.wav", 0.6), "rb").read())
    out = f"gs://{BUCKET}/generated"
    _run(gcs, "keyface_jax.generate", "--face", str(inputs / "face.png"),
         "--audio", str(inputs / "speech.wav"), "--output", f"{out}/clip.mp4",
         "--keyframe", reference_run, "--interpolation", "random", "--autoencoder", "random",
         "--interpolation_bad", "none")
    summary = json.loads(epath.Path(out, "summary.json").read_text())
    assert summary["counts"] == {"done": 1}, summary
    with local_copy(f"{out}/clip.mp4") as local:
        info = probe(local)
    assert info.has_audio and abs(info.video_duration - 0.6) < 1e-6
    assert epath.Path(out, "clip.identity.png").exists()
