"""One part of the prepared accelerator check (`benchmarks/device_check.sh` runs them in order).

    python benchmarks/device_check.py env      --out DIR
    python benchmarks/device_check.py train    --out DIR [--variant full] [--budget S]
    python benchmarks/device_check.py generate --out DIR [--variant small] [--budget S]

Each part writes DIR/device_<part>.json, and `train` rewrites it after every measured variant, so a
part cut short by its time limit keeps what it finished. Imports stay within what a lent machine
has (jax, flax, optax, numpy; ml_collections and PyAV travel as wheels): no grain, tfds or torch.

- env: devices, library versions and a measured bf16 matmul rate (the ceiling MFU is read against,
  beside the datasheet peak of `training.metrics.PEAK_FLOPS`).
- train: the `full` keyframe train step as the trainer runs it (bf16 compute on fp32 master weights,
  AdamW, the reference's trainable preset), for attention backends × remat policies at batch 1.
  All variants are lowered first and compiled in parallel threads (XLA compiles outside the GIL);
  then each runs warm-up + timed steps on ONE train state that every variant shares (same pytree,
  donated from one to the next). Per variant: compile seconds, the compiler's memory analysis
  (argument / output / temporary bytes), median step time, FLOPs (XLA cost analysis), MFU. Then
  the largest batch that fits: temporaries at batch 1 and 2 of the fastest variant give bytes per
  clip; the batch predicted to fill 90 % of the device is compiled and run.
- generate: packed batched long-video generation against the per-clip loop (batch 1), `small`
  config, random weights, through the real pipeline (mp4 writing included), after both compiled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import median_seconds  # noqa: E402


class Report:
    """A part's JSON file, rewritten whenever a figure is added."""

    def __init__(self, out: pathlib.Path, part: str):
        self.path = out / f"device_{part}.json"
        self.data = dict(part=part, started=datetime.datetime.now(datetime.timezone.utc)
                         .isoformat(timespec="seconds"))
        self.start = time.perf_counter()

    def add(self, **values) -> None:
        self.data.update(values)
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ----------------------------------------------------------------------------- env


def part_env(args) -> None:
    import jax
    import jax.numpy as jnp

    report = Report(args.out, "env")
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "numpy", "av"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "?")
        except ImportError as e:
            versions[name] = f"missing ({e})"
    device = jax.devices()[0]
    report.add(python=platform.python_version(), versions=versions, backend=jax.default_backend(),
               devices=[d.device_kind for d in jax.devices()], memory_stats=device.memory_stats())
    n = 8192 if jax.default_backend() != "cpu" else 1024
    dtype = jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda a: a @ a)
    seconds = median_seconds(lambda: matmul(a), 10)
    report.add(matmul=dict(n=n, dtype=str(jnp.dtype(dtype)), seconds=seconds,
                           flops_per_s=2.0 * n ** 3 / seconds))
    print(json.dumps(report.data, indent=1, default=str), flush=True)


# ----------------------------------------------------------------------------- train


def _train_config(variant: str, batch: int, attention: str, remat_policy: str):
    from configs import keyframe

    config = keyframe.get_config(variant)
    config.train.batch_size = batch
    config.optim.ema_decay = 0.0
    config.optim.accum_steps = 1
    config.objective.pixel_weight = 0.0   # the pixel losses need VAE/LPIPS weight files
    config.model.attention = attention
    config.model.remat = remat_policy != "none"
    config.model.remat_policy = remat_policy
    if variant != "full":                 # CPU smoke runs: the full variant's compute dtype
        config.model.dtype = "float32"
    return config


class TrainBench:
    """Builds the train state once and lowers/compiles the step for (attention, remat, batch)."""

    def __init__(self, variant: str, frames: int):
        import jax
        from flax import nnx

        from keyface_jax.config_lib import network_config
        from keyface_jax.models.keyface import build_network
        from keyface_jax.training.optimizer import make_optimizer
        from keyface_jax.training.state import init_train_state
        from keyface_jax.training.trainable import split_network

        self.variant, self.frames = variant, frames
        config = _train_config(variant, 1, "xla", "none")
        net_cfg = network_config(config.model)
        self.tx, self.schedule = make_optimizer(config.optim)

        def create():
            network = build_network(net_cfg, rngs=nnx.Rngs(0))
            trainable, frozen = split_network(network, config.trainable)[1:]
            return init_train_state(trainable, frozen, self.tx, 0, ema=False)

        self.state = jax.block_until_ready(jax.jit(create)())
        self.params = sum(x.size for x in jax.tree.leaves(self.state.params))

    def lower(self, attention: str, remat_policy: str, batch: int):
        import jax
        import jax.numpy as jnp

        from keyface_jax.config_lib import network_config
        from keyface_jax.data.synthetic_batches import SyntheticBatches
        from keyface_jax.models.build import abstract_network
        from keyface_jax.train import objective_config
        from keyface_jax.training.metrics import compiled_flops
        from keyface_jax.training.step import make_train_step
        from keyface_jax.training.trainable import split_network

        config = _train_config(self.variant, batch, attention, remat_policy)
        net_cfg = network_config(config.model)
        graphdef = split_network(abstract_network(net_cfg), config.trainable)[0]
        host = SyntheticBatches(net_cfg, batch, self.frames, 0).global_batch_at(0)
        batch_arrays = {k: jnp.asarray(v) for k, v in host.items()}
        step = jax.jit(make_train_step(graphdef, objective_config(config), self.tx, self.schedule),
                       donate_argnums=(0,))
        lowered = step.lower(self.state, batch_arrays, {})
        return lowered, batch_arrays, compiled_flops(lowered)

    def run(self, compiled, batch_arrays, warmup: int, steps: int) -> tuple[list[float], float]:
        import jax
        times, loss = [], float("nan")
        for i in range(warmup + steps):
            start = time.perf_counter()
            self.state, metrics = compiled(self.state, batch_arrays, {})
            jax.block_until_ready(metrics)
            if i >= warmup:
                times.append(time.perf_counter() - start)
            loss = float(metrics["loss"])
        return times, loss


def _memory(compiled) -> dict:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {f.replace("_size_in_bytes", "_bytes"): int(getattr(analysis, f, 0) or 0) for f in fields}


def _compile_all(lowered: dict) -> dict:
    """Compiles every lowered program in parallel threads; {key: (compiled | exception, seconds)}."""
    def compile_one(item):
        key, low = item
        start = time.perf_counter()
        try:
            return key, low.compile(), time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - recorded per variant (e.g. a backend that cannot run)
            return key, e, time.perf_counter() - start
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(len(lowered), 1)) as pool:
        return {k: (c, s) for k, c, s in pool.map(compile_one, lowered.items())}


def part_train(args) -> None:
    import jax

    from keyface_jax.training.metrics import peak_flops_per_device

    report = Report(args.out, "train")
    device = jax.devices()[0]
    peak = peak_flops_per_device(0.0, device)
    accelerator = jax.default_backend() != "cpu"
    fused = "cudnn" if jax.default_backend() == "gpu" else "chunked"
    variants = [(fused, "block"), ("xla", "block"), (fused, "none"), (fused, "block_save_attention")]
    if args.variants:
        variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    bench = TrainBench(args.variant, args.frames)
    report.add(device=device.device_kind, variant=args.variant, frames=args.frames,
               trainable_params=bench.params, peak_flops_per_s=peak,
               variants_planned=[f"{a}:{r}" for a, r in variants], results={})
    print(f"state built ({bench.params / 1e6:.1f} M trainable) in {report.elapsed():.0f} s", flush=True)

    lowered, batches, flops = {}, {}, {}
    for attention, remat in variants:
        start = time.perf_counter()
        lowered[(attention, remat)], batches[(attention, remat)], flops[(attention, remat)] = \
            bench.lower(attention, remat, 1)
        print(f"lowered {attention}:{remat} in {time.perf_counter() - start:.0f} s", flush=True)
    start = time.perf_counter()
    compiled = _compile_all(lowered)
    print(f"compiled {len(compiled)} variants in parallel in {time.perf_counter() - start:.0f} s",
          flush=True)
    del lowered

    results = report.data["results"]
    best = None
    for key in variants:
        name = f"{key[0]}:{key[1]}"
        program, compile_s = compiled[key]
        if isinstance(program, Exception):
            results[name] = dict(error=f"{type(program).__name__}: {str(program)[:400]}",
                                 compile_s=compile_s)
            report.add(results=results)
            continue
        if report.elapsed() > args.budget:
            results[name] = dict(skipped="time budget", compile_s=compile_s, memory=_memory(program))
            report.add(results=results)
            continue
        times, loss = bench.run(program, batches[key], args.warmup, args.steps)
        seconds = statistics.median(times)
        results[name] = dict(batch=1, compile_s=compile_s, memory=_memory(program),
                             step_s=seconds, step_s_all=times, loss=loss, flops=flops[key],
                             mfu=flops[key] / seconds / peak if peak and flops[key] else None)
        report.add(results=results)
        print(f"{name}: {seconds * 1e3:.1f} ms/step, MFU {results[name]['mfu']}, "
              f"temp {results[name]['memory'].get('temp_bytes', 0) / 2**30:.2f} GiB", flush=True)
        if best is None or seconds < results[best]["step_s"]:
            best = name
        compiled[key] = (None, compile_s)
        gc.collect()
    if best is None or not accelerator and not args.batch_search:
        return
    _largest_batch(args, report, bench, tuple(best.split(":")), device)


def _largest_batch(args, report, bench, key, device) -> None:
    """Bytes per clip from the temporaries at batch 1 and 2; the batch predicted to fill 90 % of
    the device is compiled and run (halved while it does not fit)."""
    from keyface_jax.training.metrics import peak_flops_per_device
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit") or args.memory_limit
    search = dict(variant=":".join(key), device_bytes=limit)
    lowered2, _, _ = bench.lower(*key, 2)
    memory2 = _memory(lowered2.compile())
    memory1 = report.data["results"][":".join(key)]["memory"]
    per_clip = memory2["temp_bytes"] - memory1["temp_bytes"]
    fixed = memory1["argument_bytes"] + memory1["temp_bytes"] - per_clip
    batch = max(int((0.9 * limit - fixed) // max(per_clip, 1)), 1) if limit else 2
    search.update(per_clip_temp_bytes=per_clip, fixed_bytes=fixed, predicted_max_batch=batch)
    report.add(batch_search=search)
    peak = peak_flops_per_device(0.0, device)
    while batch >= 2 and report.elapsed() < args.budget + 120:
        try:
            lowered, arrays, flops = bench.lower(*key, batch)
            program = lowered.compile()
            times, loss = bench.run(program, arrays, args.warmup, args.steps)
        except Exception as e:  # noqa: BLE001 - out of memory at run time: try half the batch
            search.setdefault("failed", []).append(dict(batch=batch, error=str(e)[:300]))
            report.add(batch_search=search)
            batch //= 2
            gc.collect()
            continue
        seconds = statistics.median(times)
        search.update(batch=batch, memory=_memory(program), step_s=seconds, loss=loss, flops=flops,
                      clips_per_s=batch / seconds,
                      mfu=flops / seconds / peak if peak and flops else None)
        report.add(batch_search=search)
        print(f"largest batch {batch}: {seconds:.3f} s/step, MFU {search['mfu']}", flush=True)
        return


# ----------------------------------------------------------------------------- generate


def part_generate(args) -> None:
    import tempfile

    import jax

    from keyface_jax.generation.inputs import ClipRequest
    from keyface_jax.generation.pipeline import GenerationOptions
    from keyface_jax.generation.runner import ModelSources, Setup
    from keyface_jax.testing.media import write_face, write_speech

    report = Report(args.out, "generate")
    sources = ModelSources(keyframe_config=f"configs/keyframe.py:{args.variant}",
                           interpolation_config=f"configs/interpolation.py:{args.variant}",
                           interpolation_bad="random")

    def setup(batch: int):
        options = GenerationOptions(keyframe_batch=batch, interpolation_batch=batch,
                                    decode_batch=batch)
        return Setup(sources, options)

    lengths = [float(s) for s in args.lengths.split(",")]
    batched, single = setup(args.batch), setup(1)
    report.add(device=jax.devices()[0].device_kind, variant=args.variant, batch=args.batch,
               clip_seconds=lengths)
    with tempfile.TemporaryDirectory() as folder:
        face = write_face(os.path.join(folder, "face.png"))   # centre-cropped and resized on load
        clips = [batched.load(ClipRequest(name=f"clip{k}", face=face, seed=k,
                                          audio=write_speech(os.path.join(folder, f"a{k}.wav"), s, seed=k),
                                          output=os.path.join(folder, f"clip{k}.mp4")))
                 for k, s in enumerate(lengths)]
        outputs = lambda tag: [os.path.join(folder, f"{tag}{k}.mp4") for k in range(len(clips))]

        def timed(fn) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        warm = dict(batched=timed(lambda: batched.generator.generate(clips[:1], outputs("wb")[:1], progress=False)),
                    loop=timed(lambda: single.generator.generate(clips[:1], outputs("ws")[:1], progress=False)))
        report.add(first_call_s=warm)
        video_seconds = sum(c.num_frames for c in clips) / 25
        times = dict(loop=[], batched=[])
        for _ in range(args.repeats):
            times["loop"].append(timed(lambda: [single.generator.generate([c], [o], progress=False)
                                               for c, o in zip(clips, outputs("s"))]))
            times["batched"].append(timed(lambda: batched.generator.generate(clips, outputs("b"),
                                                                             progress=False)))
            best = {k: min(v) for k, v in times.items()}
            report.add(video_seconds=video_seconds, seconds=times,
                       video_seconds_per_second={k: video_seconds / v for k, v in best.items()},
                       speedup_batched_vs_loop=best["loop"] / best["batched"])
            print(f"batched {video_seconds / best['batched']:.2f} vs loop "
                  f"{video_seconds / best['loop']:.2f} video-s/s", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("env", "train", "generate"))
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--variant", default=None, help="config variant (train: full; generate: small)")
    p.add_argument("--frames", type=int, default=14)
    p.add_argument("--variants", default="", help="train: attention:remat,... (default: the matrix)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget", type=float, default=300.0, help="seconds after which a part stops timing")
    p.add_argument("--batch_search", action="store_true", help="train: also on CPU")
    p.add_argument("--memory_limit", type=float, default=0.0, help="device bytes when stats lack it")
    p.add_argument("--batch", type=int, default=8, help="generate: packed batch")
    p.add_argument("--lengths", default="6,9,12,7.5,10,8,11,6.5", help="generate: clip seconds")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    args.variant = args.variant or {"train": "full", "generate": "small"}.get(args.part, "tiny")
    {"env": part_env, "train": part_train, "generate": part_generate}[args.part](args)


if __name__ == "__main__":
    main()
