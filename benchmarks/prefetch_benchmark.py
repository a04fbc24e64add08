"""Trainer step time with and without the device-prefetching loader.

Runs the real trainer (`keyface_jax.train.train`, tiny keyframe config, 4-frame clips, batch 4)
on a synthetic prepared dataset whose batches carry every clip frame as pixels (`pixel_frames=-1`:
16 PNG decodes and 3 MB to copy per batch), in three loader settings, alternated over rounds:

  sync          read_threads=0, prefetch=0, device_prefetch=0: read, decode and copy each batch
                on the critical path
  host_prefetch read_threads=2, prefetch=2, device_prefetch=0: what the trainer did before the
                prefetching loader was wired in (reads ahead, then a synchronous host → device copy)
  full          read_threads=2, prefetch=2, device_prefetch=2: the default (batches already on the
                devices when the step asks for them)

and reports, per setting, the median over rounds of the mean step time and of the mean time the
training loop waited for its next batch (`data_wait_seconds` in metrics.jsonl; the first step,
which holds the compilation, is left out). Ratios are against `sync` of the same round.

    python benchmarks/prefetch_benchmark.py [--rounds 2] [--steps 12]   # ≈ 4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SETTINGS = {"sync": (0, 0, 0), "host_prefetch": (2, 2, 0), "full": (2, 2, 2)}


def _config(dataset: str, steps: int, setting: str):
    from configs import keyframe
    config = keyframe.get_config("tiny,frames=4")
    threads, prefetch, device = SETTINGS[setting]
    config.data.update(path=dataset, read_threads=threads, prefetch=prefetch,
                       device_prefetch=device)
    config.data.pixel_frames = -1
    config.train.update(steps=steps, log_every=1, checkpoint_every=10 ** 6)
    return config


def _means(workdir: str) -> tuple[float, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()][1:]   # step 1 holds the compile
    return (statistics.mean(r["step_seconds"] for r in rows),
            statistics.mean(r["data_wait_seconds"] for r in rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/prefetch_cpu.json"))
    args = parser.parse_args()
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(),
                                                                    "keyface_prefetch_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import jax

    from benchmarks.loader_benchmark import write_dataset
    from keyface_jax.paths import write_json
    from keyface_jax.train import train

    rows = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = os.path.join(tmp, "dataset")
        write_dataset(dataset, videos=4, frames=300, latent=16, audio_dim=32, image=128)
        for round_ in range(args.rounds):
            for name in SETTINGS:
                workdir = os.path.join(tmp, f"{name}_{round_}")
                start = time.perf_counter()
                train(_config(dataset, args.steps, name), workdir)
                step_s, wait_s = _means(workdir)
                rows[name].append(dict(step_s=step_s, data_wait_s=wait_s,
                                       run_s=time.perf_counter() - start))
                print(f"round {round_} {name:13s} step {step_s * 1e3:7.1f} ms, waiting for data "
                      f"{wait_s * 1e3:6.1f} ms", flush=True)
    summary = {}
    for name, runs in rows.items():
        summary[name] = dict(
            step_ms=round(1e3 * statistics.median(r["step_s"] for r in runs), 1),
            data_wait_ms=round(1e3 * statistics.median(r["data_wait_s"] for r in runs), 2),
            step_vs_sync=round(statistics.median(
                r["step_s"] / s["step_s"] for r, s in zip(runs, rows["sync"])), 3))
    result = dict(
        machine=dict(cpus=os.cpu_count(), python=platform.python_version(), jax=jax.__version__,
                     devices=len(jax.devices()), load_average_1min=round(os.getloadavg()[0], 2)),
        workload="tiny keyframe, 4-frame clips, batch 4, pixel_frames=-1 (all clip frames as pixels)",
        settings={k: dict(zip(("read_threads", "prefetch", "device_prefetch"), v))
                  for k, v in SETTINGS.items()},
        steps_per_run=args.steps, rounds=args.rounds, summary=summary, runs=rows)
    for name, values in summary.items():
        print(f"{name:13s} step {values['step_ms']:7.1f} ms ({values['step_vs_sync']:.3f}× sync), "
              f"waiting for data {values['data_wait_ms']:6.2f} ms")
    write_json(args.out, result, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
