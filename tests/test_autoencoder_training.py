"""Autoencoder training mode (`python -m keyface_jax.train --config=configs/autoencoder.py:tiny`) on
the 128-px demo videos (32-px crops, batch 4: seconds per run on 2 cores).

One run is killed (-9) a few steps past a checkpoint and re-run to the end; it then checks:
- the re-run repeats the steps after the checkpoint bit for bit, and the loss falls overall;
- WORKDIR/export loads into load_orbax_export, frozen_decoder and data preparation's encoder with
  bitwise-equal weights, and scores exactly what the trainer scored at the end of its run.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from configs import keyframe
from keyface_jax.conversion.keyface_ckpt import load_orbax_export
from keyface_jax.config_lib import autoencoder_config
from keyface_jax.data.video_frames import evaluation_frames, load_video_frames
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.training import autoencoder_trainer
from keyface_jax.training.weight_sources import frozen_decoder
from keyface_jax.training.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shared with tests/test_train.py: a re-run of the test compiles nothing again.
CACHE = os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")
STEPS, CHECKPOINT_EVERY, EVAL_FRAMES = 24, 8, 4


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=CACHE,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TQDM_DISABLE="1",
                XLA_FLAGS="--xla_force_host_platform_device_count=4")


def _command(videos, workdir):
    return [sys.executable, "-m", "keyface_jax.train", "--config=configs/autoencoder.py:tiny",
            f"--workdir={workdir}", f"--config.data.videos={videos}", "--config.data.crop_size=32",
            "--config.train.batch_size=4", f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
            f"--config.train.eval_frames={EVAL_FRAMES}", "--config.optim.warmup_steps=2"]


def _losses(workdir) -> dict[int, float]:
    """Step → loss; a step logged twice (re-run after a resume) keeps its latest value."""
    return {row["step"]: row["loss"] for row in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "loss" in row}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-m", "data_pipelines.demo.build", "--output", str(out),
                    "--num_videos", "2", "--seconds", "2", "--size", "128", "--seed", "0"],
                   cwd=ROOT, check=True, capture_output=True, env=_env())
    return str(out / "videos")


@pytest.fixture(scope="module")
def killed_and_resumed(videos, tmp_path_factory):
    """(workdir, losses logged before the kill, stdout of the completing run)."""
    workdir = tmp_path_factory.mktemp("ae")
    metrics = workdir / "metrics.jsonl"
    proc = subprocess.Popen(_command(videos, workdir), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= CHECKPOINT_EVERY + 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _losses(workdir)
    done = subprocess.run(_command(videos, workdir), env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return str(workdir), before, done.stdout


def test_resume_after_kill_repeats_the_steps_bitwise_and_the_loss_falls(killed_and_resumed):
    workdir, before, out = killed_and_resumed
    resumed_from = int(out.split("done: steps ")[1].split(" ")[0])
    # Orbax also keeps step 1 (a manager with no checkpoint saves the first step it sees).
    assert resumed_from in (1, *range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY)), resumed_from
    assert resumed_from < max(before)
    after = _losses(workdir)
    assert sorted(after) == list(range(1, STEPS + 1))
    repeated = range(resumed_from + 1, max(before) + 1)
    assert [after[s] for s in repeated] == [before[s] for s in repeated]  # exact equality
    first, last = np.mean([after[s] for s in (1, 2, 3)]), np.mean([after[s] for s in (22, 23, 24)])
    assert last < 0.7 * first, (first, last)
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert {"loss", "recon", "kl", "psnr", "latent_std", "grad_norm", "lr"} <= set(rows[0])


def _leaves_equal(a, b):
    flat_a, flat_b = nnx.to_flat_state(a), nnx.to_flat_state(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert np.array_equal(np.asarray(x.value), np.asarray(y.value)), path


def test_export_round_trips_into_every_reader(killed_and_resumed, videos):
    workdir, _, _ = killed_and_resumed
    export = os.path.join(workdir, "export")
    # The diffusion configs of the same variant describe the same autoencoder.
    config = keyframe.get_config("tiny")
    abstract = nnx.eval_shape(lambda: AutoencoderKL(autoencoder_config(config.autoencoder),
                                                    rngs=nnx.Rngs(0)))
    loaded = load_orbax_export(export, None, autoencoder=abstract).autoencoder
    model = nnx.merge(nnx.split(abstract)[0], loaded)

    config.init.autoencoder = export
    decoder = frozen_decoder(config.init, config.autoencoder)
    _leaves_equal(nnx.state(decoder, nnx.Param), nnx.state(model.decoder, nnx.Param))

    from data_pipelines.latents import load_encoder
    encoder = load_encoder(export, autoencoder_config(config.autoencoder))
    _leaves_equal(nnx.state(encoder.encoder, nnx.Param), nnx.state(model.encoder, nnx.Param))
    _leaves_equal(nnx.state(encoder.quant_conv, nnx.Param), nnx.state(model.quant_conv, nnx.Param))

    # The export holds the weights the run ended with: it scores exactly what the trainer logged.
    logged = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval_psnr" in r][-1]
    assert logged["step"] == STEPS
    frames = evaluation_frames(load_video_frames(videos), EVAL_FRAMES)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    scores = autoencoder_trainer.evaluate(nnx.split(model)[0], nnx.state(model, nnx.Param), frames,
                                          mesh)
    assert scores["eval_psnr"] == logged["eval_psnr"]
    # ... at SVD's latent scale: diffusion-space latents (× 0.18215) of unit standard deviation.
    assert scores["eval_latent_std"] == logged["eval_latent_std"]
    assert logged["eval_latent_std"] == pytest.approx(1 / 0.18215, rel=1e-4)
    assert np.isfinite(logged["latent_scale_factor"]) and logged["latent_scale_factor"] > 0


def test_a_preempted_run_saves_but_exports_nothing(videos, tmp_path):
    """SIGTERM: the run saves a checkpoint and exits 3 without an export, so no next stage takes
    an unfinished autoencoder for the trained one."""
    workdir = tmp_path / "ae"
    metrics = workdir / "metrics.jsonl"
    proc = subprocess.Popen(_command(videos, workdir), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "preempted" in err
    assert not (workdir / "export").exists()
    assert any((workdir / "checkpoints").iterdir())
