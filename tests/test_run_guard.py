"""Fail loud, lose nothing: what the trainer does with a workdir that already holds checkpoints.

- a checkpoint written under another configuration (EMA toggled, another trainable preset,
  parameter dtype, model size) is refused with the first differing leaves and the ways forward,
  and every file of the old run is still there byte for byte;
- checkpoints that are all unreadable are an error, never a silent restart from step 0;
- a finished run is skipped without compiling (a re-run of the demo's training stage);
- the explicit way forward, a new run initialised from the old run's parameters, works;
- the generation loader reads a run by a relative path and says why a run does not fit;
- a tiny run's console: no library INFO lines, no traceback at exit.
(The bitwise resume tests and "a truncated newest checkpoint falls back" are in test_train.py.)
"""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")
# The settings of tests/test_train.py, so the step compiles once for both (persistent cache).
BASE = [f"--config={ROOT}/configs/keyframe.py:tiny,frames=4", "--config.data.path=synthetic",
        "--config.train.log_every=1", "--config.train.checkpoint_every=3",
        "--config.train.keep_checkpoints=3"]


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=CACHE,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TQDM_DISABLE="1",
                XLA_FLAGS="--xla_force_host_platform_device_count=4")


def _train(workdir, steps, *extra, cwd=ROOT):
    cmd = [sys.executable, "-m", "keyface_jax.train", *BASE, f"--workdir={workdir}",
           f"--config.train.steps={steps}", *extra]
    return subprocess.run(cmd, env=_env(), cwd=cwd, capture_output=True, text=True, timeout=900)


def _digest(folder) -> dict[str, str]:
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """6 steps, checkpoints at 1, 3 and 6, started with a relative --workdir."""
    parent = tmp_path_factory.mktemp("runs")
    proc = _train("run", 6, cwd=parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return parent / "run", proc


def test_a_tiny_run_prints_no_library_chatter_and_no_traceback(finished_run):
    _, proc = finished_run
    assert "Traceback" not in proc.stderr and "DatasetIterator" not in proc.stderr, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if "orbax" in line.lower()], proc.stderr
    assert "done: steps 0 → 6" in proc.stdout


def test_a_finished_run_is_skipped_without_compiling(finished_run):
    workdir, _ = finished_run
    before = _digest(workdir)
    proc = _train(workdir, 6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already trained to step 6" in proc.stdout
    assert _digest(workdir) == before   # not a byte written: no compile, no save, no metrics


@pytest.mark.parametrize("override,expect", [
    ("--config.optim.ema_decay=0.99", "only in this config: ema"),
    ("--config.trainable.preset=reference", "frozen"),
    ("--config.model.param_dtype=bfloat16", "bfloat16"),
    ("--config.model.audio_dim=16", "(32, 64)"),
])
def test_a_config_change_is_refused_and_every_checkpoint_kept(finished_run, tmp_path, override,
                                                              expect):
    workdir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    before = _digest(copy)
    proc = _train(copy, 9, override)
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = proc.stderr
    assert "written under another configuration" in message and expect in message, message
    assert "--config.init.source=run" in message and "new --workdir" in message
    assert "Traceback" not in message
    assert _digest(copy) == before                          # byte for byte, nothing deleted


def test_unreadable_checkpoints_are_an_error_not_a_restart(finished_run, tmp_path):
    workdir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    for step in (copy / "checkpoints").iterdir():           # 1 (Orbax saves the first), 3, 6
        for path in (step / "state").rglob("*"):
            if path.is_file() and path.stat().st_size > 1000:
                path.write_bytes(path.read_bytes()[:100])   # truncated
    before = _digest(copy)
    proc = _train(copy, 9)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "none of them can be read" in proc.stderr and "never restarted from step 0" in proc.stderr
    assert _digest(copy) == before


def test_a_new_run_from_the_old_runs_parameters(finished_run, tmp_path):
    workdir, _ = finished_run
    proc = _train(tmp_path / "new", 1, "--config.init.source=run", f"--config.init.path={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initial weights: run" in proc.stderr + proc.stdout
    assert (tmp_path / "new" / "checkpoints" / "1").is_dir()


def test_generation_loader_reads_relative_runs_and_says_why_one_does_not_fit(finished_run,
                                                                             monkeypatch):
    from keyface_jax.config_lib import load_config
    from keyface_jax.conversion.io import CheckpointError
    from keyface_jax.generation.runner import load_network
    from keyface_jax.training.run_checkpoints import read_run_params
    workdir, _ = finished_run
    monkeypatch.chdir(workdir.parent)
    keyframe = load_config(os.path.join(ROOT, "configs/keyframe.py:tiny"))
    network = load_network(keyframe, "run")                       # relative, as the demo passes it
    params, step = read_run_params("run")
    assert step == 6
    np.testing.assert_array_equal(np.asarray(network.state["audio_proj"]["kernel"][...]),
                                  params["audio_proj"]["kernel"])
    interpolation = load_config(os.path.join(ROOT, "configs/interpolation.py:tiny"))
    with pytest.raises(CheckpointError, match="does not fit") as error:
        load_network(interpolation, "run")
    assert "no checkpoint restores" not in str(error.value)
