"""Loader throughput against the train step's appetite, on CPU, for the `tiny` keyframe config.

    .venv/bin/python benchmarks/loader_benchmark.py [--batch N] [--out FILE.json]

Writes a synthetic frame dataset at the tiny config's sizes (16×16 latents, 32-d audio, 128×128
noise PNG frames), then measures
  1. host loader throughput (clips/s per host) for worker processes × reader threads × pixel mode;
  2. the tiny keyframe network's forward+backward (`jax.grad` of an L2 loss) per batch: clips/s;
  3. that step fed by the real loader (global arrays, prefetch) against a fixed batch: the loader's
     cost when both share the CPU.
Prints a table and writes JSON. Timings on a shared 2-core machine are noisy; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import keyframe  # noqa: E402
from data_pipelines import synthetic_dataset as synthetic  # noqa: E402
from data_pipelines.dataset_writer import write_frame_dataset  # noqa: E402
from keyface_jax.data.pipeline import DataConfig, host_dataset, make_loader  # noqa: E402


def write_dataset(folder: str, videos: int, frames: int, latent: int, audio_dim: int, image: int):
    rng = np.random.default_rng(0)

    def gen():
        for entry, arrays in synthetic.synthetic_videos(
                [frames] * videos, latent_shape=(latent, latent, 4), audio_dim=audio_dim,
                frame_shape=(image, image, 3)):
            # noise frames: PNG decoding costs what it would on real crops, not a constant image
            arrays["frame"] = rng.integers(0, 256, arrays["frame"].shape, dtype=np.uint8)
            yield entry, arrays

    return write_frame_dataset(folder, gen(), latent_shape=(latent, latent, 4),
                               audio_dim=audio_dim, frame_shape=(image, image, 3),
                               shard_records=1024, overwrite=True)


def loader_rate(config: DataConfig, batches: int, warmup: int = 2) -> float:
    it = iter(host_dataset(config))
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * config.global_batch / (time.perf_counter() - t)
    if hasattr(it, "close"):
        it.close()
    return rate


def train_step_fn():
    """A jitted forward+backward of the tiny keyframe network (L2 to the clean latents); the
    trainer's step adds noise, dropout and AdamW, a small cost next to this."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tests.helpers import tiny_network

    net, config = tiny_network("keyframe")
    graphdef, state = nnx.split(net)

    def loss(state, batch):
        model = nnx.merge(graphdef, state)
        x = batch["latents"]
        out = model(x, jnp.zeros((x.shape[0],)), identity=batch["identity"] / 0.18215,
                    audio=batch["audio"], valence=batch["valence"], arousal=batch["arousal"])
        return jnp.mean((out - x) ** 2)

    step = jax.jit(jax.grad(loss))
    return step, state, config


def time_steps(step, state, batches, n: int) -> float:
    import jax
    jax.block_until_ready(step(state, next(batches)))  # compile
    t = time.perf_counter()
    for _ in range(n):
        grads = step(state, next(batches))
    jax.block_until_ready(grads)
    return (time.perf_counter() - t) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=0,
                        help="global batch (clips per step); 0: the tiny config's batch_size")
    parser.add_argument("--batches", type=int, default=30, help="batches timed per loader setting")
    parser.add_argument("--steps", type=int, default=10, help="train steps timed")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/loader_cpu.json"))
    args = parser.parse_args()

    import jax
    from keyface_jax.sharding import make_mesh

    config = keyframe.get_config("tiny")
    model = config.model
    if not args.batch:
        args.batch = int(config.train.batch_size) if "train" in config else 4
    latent, audio_dim, image = model.latent_size, model.audio_dim, 8 * model.latent_size
    results = dict(machine=dict(cpus=os.cpu_count(), python=platform.python_version(),
                                jax=jax.__version__, devices=str(jax.devices()),
                                load_average_1min=round(os.getloadavg()[0], 2)),
                   config="tiny keyframe", global_batch=args.batch,
                   record=dict(latent=[latent, latent, 4], audio=[2, audio_dim],
                               frame=[image, image, 3]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "keyface_frames", "1.0.0")
        t = time.perf_counter()
        table = write_dataset(folder, videos=12, frames=300, latent=latent, audio_dim=audio_dim,
                              image=image)
        results["dataset"] = dict(videos=len(table), records=sum(e.num_frames for e in table),
                                  write_s=round(time.perf_counter() - t, 2))
        print(f"dataset: {results['dataset']}")

        rows = []
        for pixel in (0, 1, -1):  # none, one frame per clip (the pixel loss), all 14
            for workers, threads in ((0, 0), (0, 2), (2, 0)):
                cfg = DataConfig(path=folder, global_batch=args.batch, pixel_frames=pixel,
                                 worker_count=workers, read_threads=threads, worker_buffer=2)
                rate = loader_rate(cfg, args.batches, warmup=2 if workers == 0 else 4)
                rows.append(dict(pixel_frames=pixel, workers=workers, threads=threads,
                                 clips_per_s=round(rate, 1)))
                print(f"loader  pixel_frames={pixel:2d} workers={workers} threads={threads}: "
                      f"{rate:8.1f} clips/s")
        results["loader"] = rows

        step, state, _ = train_step_fn()
        mesh = make_mesh({"data": -1})
        cfg = DataConfig(path=folder, global_batch=args.batch, read_threads=1, prefetch=2)
        loader = make_loader(cfg, mesh)
        fixed = next(loader)
        fixed = {k: fixed[k] for k in ("latents", "identity", "audio", "valence", "arousal")}

        def constant():
            while True:
                yield fixed

        def from_loader():
            while True:
                b = next(loader)
                yield {k: b[k] for k in fixed}

        fixed_s = time_steps(step, state, constant(), args.steps)
        fed_s = time_steps(step, state, from_loader(), args.steps)
        loader.close()
        results["train_step"] = dict(
            fixed_batch_step_s=round(fixed_s, 4),
            appetite_clips_per_s=round(args.batch / fixed_s, 1),
            loader_fed_step_s=round(fed_s, 4), loader_fed_slowdown=round(fed_s / fixed_s, 3))
        print(f"train step (fwd+bwd, tiny keyframe, batch {args.batch}): {fixed_s * 1e3:.0f} ms "
              f"= {args.batch / fixed_s:.1f} clips/s; fed by the loader: {fed_s * 1e3:.0f} ms "
              f"({fed_s / fixed_s:.2f}×)")
        slowest = min(r["clips_per_s"] for r in rows)
        results["slowest_loader_over_appetite"] = round(slowest / (args.batch / fixed_s), 1)
        print(f"slowest loader setting / train-step appetite: "
              f"{results['slowest_loader_over_appetite']}×")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
