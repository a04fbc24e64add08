"""Audio encoders: audio seconds encoded per second, our JAX encoders against PyTorch transformers.

    .venv/bin/python benchmarks/audio_encoder_benchmark.py                  # CPU, 10-s clips
    .venv/bin/python benchmarks/audio_encoder_benchmark.py --seconds 30 --rounds 5
    python benchmarks/audio_encoder_benchmark.py --device-mode              # accelerator, batched
    python benchmarks/audio_encoder_benchmark.py --device-mode --smoke      # its quick CPU check

CPU mode (writes benchmarks/results/audio_encoders_cpu.json): WavLM-Base+ and wav2vec2-base at
their real sizes with random weights (transformers' own initialisation, seeded), the same weights
imported into the JAX encoders (the relative difference of the two outputs is recorded), one
clip per call as the data preparation runs them. One process, same CPUs and thread count for both
(`torch.set_num_threads(threads)`; XLA sizes its pool from the CPUs the process may use, so
`--threads` below the core count pins the process to the first `threads` CPUs; OpenMP waits
passively so idle torch threads do not steal time from XLA). After a warm-up (JAX compile), the
timed calls alternate J T J T ..., so load from other processes hits both alike; medians of wall
time (and of process CPU time) give audio-s/s and the speed-up torch/JAX (> 1: JAX faster).
BEATs (iter3+ size) runs in JAX alone (no PyTorch BEATs is installed). FLOPs per call come from
XLA's cost analysis of the jitted forward.

Device mode (writes benchmarks/results/audio_encoders_<platform>.json): imports only
jax/flax/numpy and keyface_jax.audio; the three encoders at real size with random weights, a batch
of `--batch` clips per call (sharded over the local devices), compute in `--dtype` (bfloat16 by
default); reports audio-s/s per model and the compile time. `--smoke` shrinks it to one round of
a 2-clip batch of 2 s for a CPU check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS_DIR = ROOT / "benchmarks" / "results"
RATE = 16_000


def _clip(seconds: float, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8))
    return (0.1 * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) * tone
            + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _flops(runner, samples: int, padded: bool = True) -> float:
    """XLA's FLOP count of one forward of `samples` samples (batch of runner.batch_size), as run
    (zero-padded to its bucket) or, `padded=False`, of the exact length (the torch call's work)."""
    import jax.numpy as jnp
    from keyface_jax.audio.jax_encoders import _forward, bucket_samples
    shape = (runner.batch_size, bucket_samples(samples) if padded else samples)
    lowered = _forward.lower(runner._graphdef, runner._state, jnp.zeros(shape, jnp.float32),
                             jnp.zeros(shape[:1], jnp.int32))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


# ----------------------------------------------------------------------------- CPU mode


def _torch_pair(kind: str, seed: int):
    """(transformers model, JAX EncoderRunner) with the same random real-size weights."""
    import torch
    import transformers
    from keyface_jax.audio.jax_encoders import EncoderRunner
    from keyface_jax.audio.weights import speech_encoder_from_hf
    torch.manual_seed(seed)
    family = {"wavlm-base-plus": "WavLM", "wav2vec2-base": "Wav2Vec2"}[kind]
    config = getattr(transformers, f"{family}Config")()     # the -base / -base-plus shapes
    model = getattr(transformers, f"{family}Model")(config).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    jax_model, cfg = speech_encoder_from_hf({**config.to_dict(), "model_type": family.lower()},
                                            state, kind)
    return model, EncoderRunner(jax_model, cfg.output_length), cfg


def _matmul_peak(rounds: int, n: int = 2048) -> dict:
    """fp32 GFLOP/s of an n×n matmul in JAX and torch (alternated; medians), the CPU's practical
    peak against which the encoders' achieved GFLOP/s are read."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    mm = jax.jit(lambda x: x @ x)
    mm(ja).block_until_ready()
    jt, tt = [], []
    for _ in range(max(rounds, 3)):
        jt.append(_timed(lambda: mm(ja).block_until_ready())[0])
        tt.append(_timed(lambda: torch.mm(ta, ta))[0])
    flops = 2 * n ** 3 / 1e9
    return {"n": n, "jax_gflop_per_s": round(flops / statistics.median(jt), 1),
            "torch_gflop_per_s": round(flops / statistics.median(tt), 1)}


def cpu_mode(args) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    threads = args.threads or len(cpus)
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch
    from keyface_jax import cpu_allocator
    torch.set_num_threads(threads)
    clip = _clip(args.seconds)
    peak = _matmul_peak(args.rounds)
    print(f"fp32 matmul peak: JAX {peak['jax_gflop_per_s']} GFLOP/s, torch "
          f"{peak['torch_gflop_per_s']} GFLOP/s", flush=True)
    results = {}
    for kind in ("wavlm-base-plus", "wav2vec2-base"):
        model, runner, cfg = _torch_pair(kind, args.seed)
        x = torch.from_numpy(clip)[None]

        def run_torch():
            with torch.inference_mode():
                return model(x).last_hidden_state[0].numpy()

        start = time.perf_counter()
        ours = runner([clip])[0]
        compile_s = time.perf_counter() - start
        ref = run_torch()
        rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
        jax_t, torch_t = [], []
        for _ in range(args.rounds):
            jax_t.append(_timed(lambda: runner([clip])))
            torch_t.append(_timed(run_torch))
        flops = (_flops(runner, clip.size), _flops(runner, clip.size, padded=False))
        results[kind] = _summary(args.seconds, jax_t, torch_t, flops, rel, compile_s,
                                 params=sum(p.numel() for p in model.parameters()))
        r = results[kind]
        print(f"{kind}: JAX {r['jax']['audio_s_per_s']:.2f} audio-s/s, torch "
              f"{r['torch']['audio_s_per_s']:.2f} → speed-up {r['speedup_wall']:.2f}x "
              f"(CPU time {r['speedup_cpu']:.2f}x); rel. difference {rel:.1e}", flush=True)
        del model, runner
    results["beats-iter3-plus"] = _beats_alone(args, clip)
    return dict(threads=threads, tcmalloc=cpu_allocator.is_active(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), matmul_peak=peak,
                results=results)


def _summary(seconds, jax_t, torch_t, flops, rel, compile_s, params) -> dict:
    """flops: (JAX call on the bucket-padded clip, the exact clip as torch runs it)."""
    med = lambda xs, i: statistics.median(x[i] for x in xs)
    out = {"params": int(params), "rel_difference": rel, "jax_compile_s": round(compile_s, 2)}
    for name, ts, f in (("jax", jax_t, flops[0]), ("torch", torch_t, flops[1])):
        out[name] = {"gflop_per_call": round(f / 1e9, 2),
                     "wall_s": [round(t[0], 4) for t in ts], "cpu_s": [round(t[1], 4) for t in ts],
                     "median_wall_s": round(med(ts, 0), 4), "median_cpu_s": round(med(ts, 1), 4),
                     "audio_s_per_s": round(seconds / med(ts, 0), 3),
                     "gflop_per_s": round(f / 1e9 / med(ts, 0), 2)}
    out["speedup_wall"] = round(med(torch_t, 0) / med(jax_t, 0), 3)
    out["speedup_cpu"] = round(med(torch_t, 1) / med(jax_t, 1), 3)
    out["speedup_per_round"] = [round(t[0] / j[0], 3) for j, t in zip(jax_t, torch_t)]
    return out


def _beats_alone(args, clip) -> dict:
    from keyface_jax.audio.beats_model import BEATS_ITER3_PLUS, abstract_beats
    from keyface_jax.audio.jax_encoders import EncoderRunner
    from keyface_jax.audio.weights import random_state
    model = random_state(abstract_beats(BEATS_ITER3_PLUS), seed=args.seed)
    runner = EncoderRunner(model, BEATS_ITER3_PLUS.output_length)
    start = time.perf_counter()
    runner([clip])
    compile_s = time.perf_counter() - start
    ts = [_timed(lambda: runner([clip])) for _ in range(args.rounds)]
    wall = statistics.median(t[0] for t in ts)
    flops = _flops(runner, clip.size)
    print(f"beats-iter3-plus: JAX {args.seconds / wall:.2f} audio-s/s", flush=True)
    return {"jax": {"wall_s": [round(t[0], 4) for t in ts], "median_wall_s": round(wall, 4),
                    "median_cpu_s": round(statistics.median(t[1] for t in ts), 4),
                    "audio_s_per_s": round(args.seconds / wall, 3),
                    "gflop_per_s": round(flops / 1e9 / wall, 2)},
            "jax_compile_s": round(compile_s, 2), "gflop_per_call": round(flops / 1e9, 2)}


# ----------------------------------------------------------------------------- device mode


def device_mode(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from keyface_jax.audio.beats_model import BEATS_ITER3_PLUS, abstract_beats
    from keyface_jax.audio.jax_encoders import EncoderRunner
    from keyface_jax.audio.speech_model import PRESETS, abstract_speech_encoder
    from keyface_jax.audio.weights import random_state
    dtype = jnp.dtype(args.dtype)
    batch = args.batch * max(1, len(jax.local_devices()) if args.per_device else 1)
    clips = [_clip(args.seconds, seed=i) for i in range(batch)]
    builders = {
        "wavlm-base-plus": lambda: (abstract_speech_encoder(PRESETS["wavlm-base-plus"], dtype),
                                    PRESETS["wavlm-base-plus"].output_length),
        "wav2vec2-base": lambda: (abstract_speech_encoder(PRESETS["wav2vec2-base"], dtype),
                                  PRESETS["wav2vec2-base"].output_length),
        "beats-iter3-plus": lambda: (abstract_beats(BEATS_ITER3_PLUS, dtype),
                                     BEATS_ITER3_PLUS.output_length),
    }
    results = {}
    for name, build in builders.items():
        module, length = build()
        runner = EncoderRunner(random_state(module, seed=args.seed), length, batch_size=batch)
        start = time.perf_counter()
        out = runner(clips)
        compile_s = time.perf_counter() - start
        finite = bool(all(np.isfinite(o).all() for o in out))
        walls = [_timed(lambda: runner(clips))[0] for _ in range(args.rounds)]
        wall = statistics.median(walls)
        flops = _flops(runner, clips[0].size)
        results[name] = {"batch": batch, "compile_s": round(compile_s, 2), "finite": finite,
                         "wall_s": [round(w, 4) for w in walls], "median_wall_s": round(wall, 4),
                         "audio_s_per_s": round(batch * args.seconds / wall, 1),
                         "gflop_per_call": round(flops / 1e9, 1),
                         "tflop_per_s": round(flops / 1e12 / wall, 2)}
        print(f"{name}: {results[name]['audio_s_per_s']} audio-s/s (batch {batch} × "
              f"{args.seconds:g} s, {dtype.name}), compile {compile_s:.1f} s", flush=True)
    return dict(platform=jax.devices()[0].platform, device=str(jax.devices()[0].device_kind),
                devices=len(jax.devices()), dtype=dtype.name, results=results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device-mode", action="store_true", help="batched JAX throughput only")
    p.add_argument("--smoke", action="store_true", help="device mode: tiny CPU check")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per framework")
    p.add_argument("--threads", type=int, default=0, help="CPU mode: threads (default: all)")
    p.add_argument("--batch", type=int, default=16, help="device mode: clips per call")
    p.add_argument("--per-device", action="store_true", help="device mode: --batch per device")
    p.add_argument("--dtype", default="bfloat16", help="device mode: compute dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="", help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.smoke:
        args.device_mode, args.seconds, args.rounds, args.batch = True, 2.0, 1, 2
    started = time.time()
    load_start = os.getloadavg()
    body = device_mode(args) if args.device_mode else cpu_mode(args)
    record = {"benchmark": "audio_encoders", "mode": "device" if args.device_mode else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "command": " ".join(sys.argv),
              "settings": {k: v for k, v in vars(args).items() if k != "output"},
              "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
              "total_s": round(time.time() - started, 1), **body}
    if not args.device_mode:
        record["goal"] = "JAX ≥ 1.5x the transformers path (wall-time medians, same threads)"
        record["notes"] = (
            "speedup = median torch wall time / median JAX wall time of alternated calls (per "
            "round in speedup_per_round); gflop_per_call from XLA's cost analysis (JAX: the clip "
            "zero-padded to its bucket; torch: the exact clip); matmul_peak = fp32 GFLOP/s of a "
            "2048² matmul at the same threads, the practical ceiling of both frameworks here: "
            "the encoders are almost all matmul/convolution FLOPs")
    default = ("audio_encoders_cpu.json" if not args.device_mode else
               f"audio_encoders_{body['platform']}{'_smoke' if args.smoke else ''}.json")
    out = pathlib.Path(args.output) if args.output else RESULTS_DIR / default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({record['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
