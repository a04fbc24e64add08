"""Sampler overhead over the bare network: one guided step and a full keyframe sampling run.

    .venv/bin/python benchmarks/sampling_benchmark.py            # tiny + small, 14 frames
    .venv/bin/python benchmarks/sampling_benchmark.py --quick    # tiny only, 4 frames, few repeats

For each config variant it times, on whatever JAX backend is present (CPU here):
  - `network`:   one network call on the guidance-folded batch (3·B for keyframes), i.e. the work a
                 guided step cannot avoid, against `step`: one guided Euler step (fold x and σ,
                 precondition, network, 3-branch combine, update) at a mid-schedule σ;
  - `network_x11`: the 11 bare network calls of a sampling run, on the inputs recorded along the
                 sampler's own trajectory, against `sampling`: `sample_keyframes` end to end (noise
                 draw + 11 steps under one jit);
  - `interpolation_step`: one autoguided interpolation step against its two bare network calls.
FLOPs come from XLA's cost analysis of the compiled programs; XLA counts a while-loop body once, so
the full-sampling figure is derived as steps × per-step FLOPs. Overheads are ratios measured in the
same run: min over repeats, interleaved so that machine noise hits both sides alike, as wall
time and as process CPU time (steadier when other processes share the cores); every repeat's
(wall, CPU) pair is kept in the JSON.
Writes benchmarks/results/sampling_cpu.json (`--quick`: sampling_cpu_quick.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import interpolation, keyframe  # noqa: E402
from keyface_jax.config_lib import network_config  # noqa: E402
from keyface_jax.diffusion.scalings import vscaling  # noqa: E402
from keyface_jax.models import build  # noqa: E402
from keyface_jax.models.keyface import build_network  # noqa: E402
from keyface_jax.sampling import guided, sampler  # noqa: E402
from keyface_jax.sampling.euler import euler_step, initial_noise  # noqa: E402
from keyface_jax.sampling.schedules import ays_sigmas  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "sampling_cpu.json"


def random_network(kind: str, variant: str, seed: int = 0):
    """(graphdef, state, config) with random weights, filled from numpy (eager init is slow)."""
    configs = keyframe if kind == "keyframe" else interpolation
    config = network_config(configs.get_config(variant).model)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_network(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    leaves = []
    for path, var in nnx.to_flat_state(abstract):
        noise = rng.standard_normal(var.shape).astype(np.float32)
        fan_in = np.prod(var.shape[:-1]) if len(var.shape) >= 2 else 1
        value = noise / np.sqrt(fan_in) if len(var.shape) >= 2 else 0.1 * noise
        leaves.append((path, var.replace(jnp.asarray(value, var.dtype))))
    return graphdef, nnx.from_flat_state(leaves), config


def random_conditions(config, batch: int, frames: int, seed: int = 1) -> dict:
    conds = build.random_conditions(config, batch, frames, np.random.default_rng(seed))
    return {k: jnp.asarray(v) for k, v in conds.items()}


def compile_with_cost(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, float(cost.get("flops", float("nan"))), time.perf_counter() - start


def run_once(compiled, args) -> tuple[float, float]:
    """(wall, CPU) seconds. CPU time summed over this process's threads is less disturbed than
    wall time by other processes time-slicing the same cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_times(programs: dict, reps: int, warmup: bool = True) -> dict:
    """(wall, CPU) times per program over reps, alternating programs within each repeat (so load
    changes on a shared machine hit both sides of a ratio alike)."""
    times = {name: [] for name in programs}
    for name, (compiled, args) in programs.items():
        if warmup:  # first-run allocations; negligible for multi-second programs
            run_once(compiled, args)
    for _ in range(reps):
        for name, (compiled, args) in programs.items():
            times[name].append(run_once(compiled, args))
    return times


def best(times: dict) -> tuple[dict, dict]:
    """Min wall and min CPU seconds per program."""
    return ({name: min(w for w, _ in ts) for name, ts in times.items()},
            {name: min(c for _, c in ts) for name, ts in times.items()})


def bench_keyframes(variant: str, batch: int, frames: int, reps: int, full_reps: int) -> dict:
    """Guided step and full sampling against the bare network on the very inputs the sampler feeds
    it (recorded along a real trajectory), so value-dependent costs cancel."""
    graphdef, state, config = random_network("keyframe", variant)
    conds = random_conditions(config, batch, frames)
    sigmas = jnp.asarray(ays_sigmas(10))
    num_evals = int(sigmas.shape[0]) - 1
    keys = jax.random.split(jax.random.key(0), batch)
    scales = (jnp.float32(5.0), jnp.float32(2.0))
    n = len(guided.KEYFRAME_BRANCHES)
    flags = guided.branch_flags(guided.KEYFRAME_BRANCHES, batch)
    folded = dict(guided.fold_branches(conds, n), **flags)

    def step(state, x, sigma, sigma_next, conds, audio_scale, ref_scale):
        fn = guided.keyframe_cfg_denoiser(nnx.merge(graphdef, state), conds, audio_scale, ref_scale)
        return euler_step(x, fn(x, jnp.full((batch,), sigma)), sigma, sigma_next)

    def network_inputs(x, sigma):
        _, _, c_in, c_noise = vscaling(jnp.full((batch * n,), sigma))
        return c_in[:, None, None, None, None] * guided.fold_branches(x, n), c_noise

    def network(state, x_in, c_noise, folded):
        return nnx.merge(graphdef, state)(x_in, c_noise, **folded)

    def network_loop(state, x_ins, c_noises, folded):
        # The sampler's 11 network calls alone; summing the outputs keeps every call live.
        net = nnx.merge(graphdef, state)
        body = lambda i, acc: acc + net(x_ins[i], c_noises[i], **folded)
        return jax.lax.fori_loop(0, x_ins.shape[0], body, jnp.zeros_like(x_ins[0]))

    def sampling(state, conds, keys, sigmas, audio_scale, ref_scale):
        return sampler._keyframes(graphdef, state, conds, keys, sigmas, audio_scale, ref_scale)

    # Record the network inputs along the sampler's own trajectory (same noise, same steps).
    latent = (frames, config.latent_size, config.latent_size, config.latent_channels)
    x = initial_noise(keys, latent) * jnp.sqrt(1.0 + sigmas[0] ** 2)
    step_c, step_flops, step_compile = compile_with_cost(step, state, x, sigmas[0], sigmas[1],
                                                         conds, *scales)
    inputs_fn = jax.jit(network_inputs)
    xs, x_ins, c_noises = [], [], []
    for i in range(num_evals):
        xs.append(x)
        x_in, c_noise = inputs_fn(x, sigmas[i])
        x_ins.append(x_in)
        c_noises.append(c_noise)
        x = step_c(state, x, sigmas[i], sigmas[i + 1], conds, *scales)
    x_ins, c_noises = jnp.stack(x_ins), jnp.stack(c_noises)

    net_c, net_flops, net_compile = compile_with_cost(network, state, x_ins[0], c_noises[0], folded)
    loop_c, _, loop_compile = compile_with_cost(network_loop, state, x_ins, c_noises, folded)
    full_c, full_flops_body_once, full_compile = compile_with_cost(sampling, state, conds, keys,
                                                                   sigmas, *scales)
    trajectory_error = float(jnp.abs(full_c(state, conds, keys, sigmas, *scales) - x).max())
    mid = num_evals // 2  # a mid-schedule step, on its recorded values
    times = interleaved_times({
        "network": (net_c, (state, x_ins[mid], c_noises[mid], folded)),
        "step": (step_c, (state, xs[mid], sigmas[mid], sigmas[mid + 1], conds, *scales))}, reps)
    times.update(interleaved_times({
        "network_x11": (loop_c, (state, x_ins, c_noises, folded)),
        "sampling": (full_c, (state, conds, keys, sigmas, *scales))}, full_reps, warmup=False))
    t, cpu = best(times)
    return dict(
        batch=batch, frames=frames, branches=n, network_evals=num_evals,
        network_gflops=net_flops / 1e9, step_gflops=step_flops / 1e9,
        sampling_gflops_derived=num_evals * step_flops / 1e9,
        sampling_gflops_xla_loop_body_once=full_flops_body_once / 1e9,
        step_flop_overhead_pct=100 * (step_flops / net_flops - 1),
        network_s=t["network"], step_s=t["step"],
        step_time_overhead_pct=100 * (t["step"] / t["network"] - 1),
        network_x11_s=t["network_x11"], sampling_s=t["sampling"],
        sampling_time_overhead_pct=100 * (t["sampling"] / t["network_x11"] - 1),
        step_cpu_time_overhead_pct=100 * (cpu["step"] / cpu["network"] - 1),
        sampling_cpu_time_overhead_pct=100 * (cpu["sampling"] / cpu["network_x11"] - 1),
        stepwise_vs_jitted_sampling_max_abs_diff=trajectory_error,
        compile_s=dict(network=net_compile, network_x11=loop_compile, step=step_compile,
                       sampling=full_compile),
        all_times_s=times,
    )


def bench_interpolation_step(variant: str, batch: int, frames: int, reps: int) -> dict:
    graphdef, good, config = random_network("interpolation", variant, seed=0)
    bad = random_network("interpolation", variant, seed=1)[1]
    conds = random_conditions(config, batch, frames)
    latent = (batch, frames, config.latent_size, config.latent_size, config.latent_channels)
    x = jax.random.normal(jax.random.key(1), latent) * 3.0
    sigma = jnp.full((batch,), 2.0)

    def two_networks(good, bad, x, sigma, conds):
        _, _, c_in, c_noise = vscaling(sigma)
        x_in = c_in[:, None, None, None, None] * x
        return tuple(nnx.merge(graphdef, s)(x_in, c_noise, **conds) for s in (good, bad))

    def step(good, bad, x, sigma, conds, scale):
        fn = guided.autoguidance_denoiser(nnx.merge(graphdef, good), nnx.merge(graphdef, bad),
                                          conds, scale)
        return euler_step(x, fn(x, sigma), sigma[0], sigma[0] * 0.5)

    scale = jnp.float32(2.0)
    net_c, net_flops, _ = compile_with_cost(two_networks, good, bad, x, sigma, conds)
    step_c, step_flops, _ = compile_with_cost(step, good, bad, x, sigma, conds, scale)
    times = interleaved_times({"network": (net_c, (good, bad, x, sigma, conds)),
                               "step": (step_c, (good, bad, x, sigma, conds, scale))}, reps)
    t, cpu = best(times)
    return dict(batch=batch, frames=frames, two_networks_gflops=net_flops / 1e9,
                step_gflops=step_flops / 1e9,
                step_flop_overhead_pct=100 * (step_flops / net_flops - 1),
                two_networks_s=t["network"], step_s=t["step"],
                step_time_overhead_pct=100 * (t["step"] / t["network"] - 1),
                step_cpu_time_overhead_pct=100 * (cpu["step"] / cpu["network"] - 1),
                all_times_s=times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny only, 4 frames, few repeats")
    parser.add_argument("--variants", default=None, help="comma list (default tiny,small)")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help=f"JSON path (default {RESULTS.name}, "
                        "or sampling_cpu_quick.json with --quick)")
    args = parser.parse_args()
    variants = (args.variants or ("tiny" if args.quick else "tiny,small")).split(",")
    frames = args.frames or (4 if args.quick else 14)
    settings = dict(quick=args.quick, variants=variants, frames=frames, batch=args.batch)
    report = dict(
        benchmark="sampling", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
        cpu_count=os.cpu_count(), jax_version=jax.__version__, settings=settings,
        load_average_at_start=os.getloadavg(), results={})
    for variant in variants:
        tiny = variant == "tiny"
        reps = 5 if args.quick else (10 if tiny else 3)
        full_reps = 3 if args.quick else (6 if tiny else 2)
        print(f"[{variant}] keyframes: batch {args.batch}, {frames} frames", flush=True)
        kf = bench_keyframes(variant, args.batch, frames, reps, full_reps)
        print(json.dumps(kf, indent=1), flush=True)
        print(f"[{variant}] interpolation autoguided step", flush=True)
        ip = bench_interpolation_step(variant, args.batch, frames, reps)
        print(json.dumps(ip, indent=1), flush=True)
        report["results"][variant] = dict(keyframes=kf, interpolation_step=ip)
    report["load_average_at_end"] = os.getloadavg()  # other processes share the CPU: context
    out = pathlib.Path(args.out or (RESULTS.with_name("sampling_cpu_quick.json") if args.quick
                                    else RESULTS))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
