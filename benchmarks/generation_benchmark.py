"""Batched long-video generation against a per-clip sequential loop, memory vs clip length, and
FLOPs per second of video for the full-size models.

    .venv/bin/python benchmarks/generation_benchmark.py            # tiny, 8 clips of 3-9 s
    .venv/bin/python benchmarks/generation_benchmark.py --quick    # 4 clips of 2-4 s

- throughput: one manifest of N clips (random tiny weights, synthetic face + speech-like audio)
  through `Generator` with packed batches (keyframe/interpolation/decode batch B), against the
  same sampler run clip by clip with batch 1 (the reference's one-clip-at-a-time loop), in the
  same process after both are compiled; reported as clip-seconds of video per wall second and
  as the ratio. Runs alternate (loop, batched, loop, batched) and the best of each is kept.
- headroom: one tiny interpolation-network call at batch 1 and at batch B, timed and costed by XLA,
  against a measured fp32 matmul peak: the per-item gain batching can give on this machine at all.
- memory: in a fresh process per length, after a 1-s clip has compiled every stage, resident memory
  sampled every 20 ms while a short and a long clip are generated; the growth over the resident
  memory before the call is what clip length costs.
- FLOPs per second of video (full config, 512 px): XLA cost analysis of one keyframe network call,
  one interpolation call and one 14-frame decode, times the calls a second of video needs
  (keyframe items hold 13 keyframes = 169 frames; a segment covers 13 frames; 11 Euler steps;
  3 CFG branches for keyframes, 2 networks for autoguided interpolation).
Writes benchmarks/results/generation_cpu.json (`--quick`: generation_cpu_quick.json). Run it under
tcmalloc as the launch scripts do (`source launch/setup_env.sh` first; see keyface_jax/cpu_allocator.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.timing import median_seconds  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def make_setup(batch: int):
    from keyface_jax.generation.pipeline import GenerationOptions
    from keyface_jax.generation.runner import ModelSources, Setup
    options = GenerationOptions(keyframe_batch=batch, interpolation_batch=batch, decode_batch=batch)
    return Setup(ModelSources(interpolation_bad="random"), options)


def make_clips(setup, folder: str, lengths: list[float]):
    from keyface_jax.generation.inputs import ClipRequest
    from keyface_jax.testing.media import write_face, write_speech
    face = write_face(os.path.join(folder, "face.png"))
    clips = []
    for k, seconds in enumerate(lengths):
        audio = write_speech(os.path.join(folder, f"clip{k}.wav"), seconds, seed=k)
        clips.append(setup.load(ClipRequest(name=f"clip{k}", face=face, audio=audio,
                                            output=os.path.join(folder, f"clip{k}.mp4"), seed=k)))
    return clips


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def throughput(args) -> dict:
    lengths = [2.0, 3.0, 4.0, 2.5] if args.quick else [3.0, 5.0, 9.0, 4.0, 6.0, 3.5, 7.0, 8.0]
    batched, single = make_setup(args.batch), make_setup(1)
    with tempfile.TemporaryDirectory() as folder:
        clips = make_clips(batched, folder, lengths)
        outputs = lambda tag: [os.path.join(folder, f"{tag}_{c.request.name}.mp4") for c in clips]
        run_batched = lambda: batched.generator.generate(clips, outputs("b"), progress=False)
        run_loop = lambda: [single.generator.generate([c], [o], progress=False)
                            for c, o in zip(clips, outputs("s"))]
        # compile both (the first clip compiles every stage)
        warm = dict(batched=timed(lambda: batched.generator.generate(clips[:1], outputs("wb")[:1],
                                                                     progress=False)),
                    loop=timed(lambda: single.generator.generate(clips[:1], outputs("ws")[:1],
                                                                 progress=False)))
        times = dict(batched=[], loop=[])
        for _ in range(args.repeats):
            times["loop"].append(timed(run_loop))
            times["batched"].append(timed(run_batched))
    video_seconds = sum(c.num_frames for c in clips) / 25
    best = {k: min(v) for k, v in times.items()}
    return dict(clips=len(clips), video_seconds=video_seconds, batch=args.batch,
                first_call_seconds=warm, seconds=times,
                video_seconds_per_second={k: video_seconds / v for k, v in best.items()},
                speedup_batched_vs_loop=best["loop"] / best["batched"])


def headroom(args) -> dict:
    """How much any batching can gain on this machine: one tiny interpolation-network call (the
    stage with 82 % of the FLOPs) at batch 1 and at batch B, against the measured fp32 matmul peak.
    If batch 1 already runs at a fraction f of the peak, no schedule can be more than 1/f faster."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from configs import interpolation
    from keyface_jax.config_lib import network_config
    from keyface_jax.models.build import example_inputs
    from keyface_jax.models.keyface import build_network

    cfg = network_config(interpolation.get_config("tiny").model)
    graphdef, state = nnx.split(build_network(cfg, rngs=nnx.Rngs(0)))

    def forward(state, inputs):
        kwargs = dict(inputs)
        return nnx.merge(graphdef, state)(kwargs.pop("x"), kwargs.pop("c_noise"), **kwargs)

    out = {}
    for batch in (1, args.batch):
        specs = example_inputs(cfg, batch=batch)
        inputs = {k: jnp.full(v.shape, 0.5, v.dtype) for k, v in specs.items()}
        compiled = jax.jit(forward).lower(state, inputs).compile()
        cost = compiled.cost_analysis()
        flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        seconds = median_seconds(lambda: compiled(state, inputs))
        out[f"batch_{batch}"] = dict(seconds=seconds, seconds_per_item=seconds / batch,
                                     flops=flops, flops_per_s=flops / seconds)
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    peak = 2.0 * n ** 3 / median_seconds(lambda: matmul(a), repeats=10)
    one, many = out["batch_1"], out[f"batch_{args.batch}"]
    out.update(matmul_peak_flops_per_s=peak,
               batch_1_fraction_of_peak=one["flops_per_s"] / peak,
               max_speedup_any_batching=peak / one["flops_per_s"],
               measured_per_item_speedup=one["seconds_per_item"] / many["seconds_per_item"])
    return out


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_worker(seconds: float, batch: int) -> None:
    """Peak resident memory while generating one clip of `seconds`, sampled every 20 ms, after a
    1-s clip has compiled every stage (so compilation does not hide the generation's own peak)."""
    import threading
    setup = make_setup(batch)
    with tempfile.TemporaryDirectory() as folder:
        warm, clip = make_clips(setup, folder, [1.0, seconds])
        setup.generator.generate([warm], [os.path.join(folder, "warm.mp4")], progress=False)
        samples, done = [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append(_current_rss_mb())
                time.sleep(0.02)
        thread = threading.Thread(target=sample, daemon=True)
        before = _current_rss_mb()
        thread.start()
        setup.generator.generate([clip], [os.path.join(folder, "out.mp4")], progress=False)
        done.set()
        thread.join()
    print(json.dumps(dict(seconds=seconds, rss_before_mb=before, peak_rss_mb=max(samples),
                          growth_mb=max(samples) - before,
                          process_max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


def memory(args) -> dict:
    lengths = [5.0, 20.0] if args.quick else [10.0, 60.0]
    out = {}
    for seconds in lengths:
        proc = subprocess.run([sys.executable, __file__, "--memory_worker", str(seconds),
                               "--batch", str(args.batch)], capture_output=True, text=True, check=True)
        out[f"{seconds:g}s"] = json.loads(proc.stdout.strip().splitlines()[-1])
    short, long = (out[f"{s:g}s"]["growth_mb"] for s in lengths)
    out["growth_short_mb"], out["growth_long_mb"] = short, long
    return out


def full_flops() -> dict:
    import jax
    from flax import nnx

    from configs import interpolation, keyframe
    from keyface_jax.config_lib import autoencoder_config, network_config
    from keyface_jax.models.autoencoder import AutoencoderKL
    from keyface_jax.models.build import forward_flops

    kf = forward_flops(network_config(keyframe.get_config("full").model), batch=3)   # 3 CFG branches
    ip = forward_flops(network_config(interpolation.get_config("full").model), batch=1)
    cfg = keyframe.get_config("full")
    ae = nnx.eval_shape(lambda: AutoencoderKL(autoencoder_config(cfg.autoencoder, use_encoder=False),
                                              rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(ae)
    z = jax.ShapeDtypeStruct((1, 14, 64, 64, 4), jax.numpy.float32)
    cost = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z)).lower(state, z).cost_analysis()
    decode = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    steps = 11
    per_item, per_segment = steps * kf, steps * 2 * ip
    items_per_second, segments_per_second = 25 / 169, 25 / 13
    per_second = items_per_second * per_item + segments_per_second * (per_segment + decode)
    return dict(keyframe_call_3branch=kf, interpolation_call=ip, decode_14_frames=decode,
                keyframe_item=per_item, interpolation_segment=per_segment,
                per_video_second=per_second,
                shares=dict(keyframes=items_per_second * per_item / per_second,
                            interpolation=segments_per_second * per_segment / per_second,
                            decoding=segments_per_second * decode / per_second))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory_worker", type=float, default=None)
    p.add_argument("--skip", default="", help="comma list of headroom,throughput,memory,flops")
    args = p.parse_args()
    if args.memory_worker is not None:
        memory_worker(args.memory_worker, args.batch)
        return
    import jax

    from keyface_jax import cpu_allocator
    skip = set(filter(None, args.skip.split(",")))
    result = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                  machine=dict(cpus=os.cpu_count(), platform=platform.platform(),
                               tcmalloc=cpu_allocator.warn_if_missing(),
                               backend=jax.default_backend(), devices=jax.device_count(),
                               load_average=os.getloadavg()))
    if "flops" not in skip:
        result["full_flops"] = full_flops()
        print(f"full config: {result['full_flops']['per_video_second'] / 1e12:.1f} TFLOP per second of video",
              flush=True)
    if "headroom" not in skip:
        result["headroom"] = h = headroom(args)
        print(f"tiny interpolation call: batch 1 runs at {h['batch_1_fraction_of_peak']:.0%} of the "
              f"{h['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak → batching can gain at most "
              f"{h['max_speedup_any_batching']:.1f}×; batch {args.batch} gains "
              f"{h['measured_per_item_speedup']:.2f}× per item", flush=True)
    if "throughput" not in skip:
        result["throughput"] = throughput(args)
        t = result["throughput"]
        print(f"tiny, {t['clips']} clips, {t['video_seconds']:.1f} s of video: batched "
              f"{t['video_seconds_per_second']['batched']:.2f} vs per-clip loop "
              f"{t['video_seconds_per_second']['loop']:.2f} video-s/s → {t['speedup_batched_vs_loop']:.2f}×",
              flush=True)
    if "memory" not in skip:
        result["memory"] = memory(args)
        print(f"peak RSS: {json.dumps(result['memory'])}", flush=True)
    result["machine"]["load_average_end"] = os.getloadavg()
    path = RESULTS / ("generation_cpu_quick.json" if args.quick else "generation_cpu.json")
    path.parent.mkdir(exist_ok=True)
    if path.exists():   # parts skipped this time keep their previous figures
        result = {**json.loads(path.read_text()), **result}
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
