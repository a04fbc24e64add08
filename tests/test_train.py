"""The trainer for real: subprocesses of `python -m keyface_jax.train` on forced CPU devices.

- kill -9 at a random step, restart: the loss trajectory is bitwise that of an uninterrupted run;
- a checkpoint written on 4 devices restores onto 2 and training continues with the same losses;
- two jax.distributed processes on localhost (gloo), FSDP over their 4 devices, checkpoint + resume;
- a broken newest checkpoint is skipped for the previous one; a config that cannot shard fails early;
- previews: the reference run writes mp4 previews and every other run, without them, reproduces its
  losses bitwise, so previews never disturb training.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 frames per clip keep each step around a second on 2 cores; the code path is the tiny config's.
BASE = ["--config=configs/keyframe.py:tiny,frames=4", "--config.data.path=synthetic",
        "--config.train.log_every=1", "--config.train.checkpoint_every=3",
        "--config.train.keep_checkpoints=3"]


CACHE = os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")


def _env(devices: int) -> dict:
    # A persistent compilation cache: each run compiles the same step, only the first pays for it.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", TQDM_DISABLE="1")
    return env


def _command(workdir, steps, *extra):
    # --config must come before its --config.* overrides.
    return [sys.executable, "-m", "keyface_jax.train", *BASE, f"--workdir={workdir}",
            f"--config.train.steps={steps}", *extra]


def _run(workdir, steps, *extra, devices=4, timeout=600):
    proc = subprocess.run(_command(workdir, steps, *extra), env=_env(devices), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(workdir) -> dict[int, float]:
    """Step → loss; a step logged twice (re-run after a resume) keeps its latest value."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def reference_workdir(tmp_path_factory):
    """9 uninterrupted steps with checkpoints at 3, 6, 9 and previews at steps 5 and 9."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _run(workdir, 9, "--config.train.preview_every=5")
    return workdir


@pytest.fixture(scope="module")
def reference_run(reference_workdir):
    return _losses(reference_workdir)


def test_reference_run_wrote_previews(reference_workdir):
    names = sorted(os.listdir(reference_workdir / "previews"))
    assert "step_000005.mp4" in names and "step_000009.mp4" in names


def _resumable_copy(reference_workdir, destination, keep_through: int):
    """The reference run as it was after step `keep_through`: later checkpoints and metrics gone."""
    shutil.copytree(reference_workdir, destination, dirs_exist_ok=True)
    for step in os.listdir(destination / "checkpoints"):
        if step.isdigit() and int(step) > keep_through:
            shutil.rmtree(destination / "checkpoints" / step)
    shutil.rmtree(destination / "previews", ignore_errors=True)
    rows = (destination / "metrics.jsonl").read_text().splitlines()
    (destination / "metrics.jsonl").write_text(
        "".join(r + "\n" for r in rows if json.loads(r)["step"] <= keep_through))


def test_kill_minus_nine_then_resume_is_bitwise_identical(reference_run, tmp_path):
    assert sorted(reference_run) == list(range(1, 10))
    kill_after = int(np.random.default_rng().integers(4, 8))  # a random step past a checkpoint
    proc = subprocess.Popen(_command(tmp_path, 9), env=_env(4), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before = max(_losses(tmp_path))
    assert steps_before < 9
    _run(tmp_path, 9)
    resumed = _losses(tmp_path)
    assert resumed == reference_run, (kill_after, resumed, reference_run)  # exact float equality


def test_checkpoint_from_four_devices_restores_onto_two(reference_workdir, reference_run, tmp_path):
    _resumable_copy(reference_workdir, tmp_path, keep_through=6)   # written on 4 devices
    _run(tmp_path, 9, devices=2)
    losses = _losses(tmp_path)
    np.testing.assert_allclose([losses[s] for s in range(7, 10)],
                               [reference_run[s] for s in range(7, 10)], rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(workdir, steps):
    port = _free_port()
    procs = [subprocess.Popen(
        _command(workdir, steps, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                 f"--process_id={i}"),
        env=_env(2), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_fsdp_checkpoint_and_resume(reference_run, tmp_path):
    _two_processes(tmp_path, 6)
    assert max(_losses(tmp_path)) == 6
    out, _ = _two_processes(tmp_path, 9)[0]
    losses = _losses(tmp_path)
    assert "steps 6 → 9" in out
    # Same global batches and keys as the 1-process run; reductions may be ordered differently.
    np.testing.assert_allclose([losses[s] for s in range(1, 10)],
                               [reference_run[s] for s in range(1, 10)], rtol=1e-5)


def test_corrupt_newest_checkpoint_falls_back_to_previous(reference_workdir, reference_run, tmp_path):
    _resumable_copy(reference_workdir, tmp_path, keep_through=6)   # checkpoints 3 and 6
    newest = tmp_path / "checkpoints" / "6" / "state"
    for path in newest.rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            path.write_bytes(b"\0" * 64)  # truncate and zero the big array files
    proc = _run(tmp_path, 9)
    assert "cannot be restored" in proc.stderr
    losses = _losses(tmp_path)
    np.testing.assert_allclose([losses[s] for s in range(4, 10)],
                               [reference_run[s] for s in range(4, 10)], rtol=0, atol=0)


def test_unshardable_mesh_fails_at_start(tmp_path):
    proc = subprocess.run(_command(tmp_path, 2, "--config.mesh.fsdp=3", "--config.train.batch_size=6"),
                          env=_env(3), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "cannot shard on mesh" in proc.stderr and "does not divide" in proc.stderr
