"""The keyframe train step on whatever device JAX sees (GPU/TPU when lent): step time, MFU, memory.

    python benchmarks/accelerator_train_step.py                          # full, bf16, batch 1 × 14
    python benchmarks/accelerator_train_step.py --variant full --batch 2 --remat
    python benchmarks/accelerator_train_step.py --variant tiny --dtype float32 --steps 3   # CPU smoke

The real step of the trainer (`make_train_step`: EDM v-objective, AdamW, NaN guard) on one device,
jitted with the state donated, on synthetic batches of the config's shapes; the pixel losses of
the full config are off (they need the VAE/LPIPS weight files). MFU = XLA cost-analysis FLOPs /
step time / the device's dense peak from `training.metrics.PEAK_FLOPS` (`--peak` overrides).
Peak memory from the device's allocator statistics where it keeps them. Writes
benchmarks/results/train_step_<device kind>_<variant>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="full")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=14)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--remat", action="store_true", help="per-block rematerialisation")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak", type=float, default=0.0, help="device peak FLOP/s (0: look it up)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.train_step_benchmark import _keyframe_config
    from keyface_jax.config_lib import network_config
    from keyface_jax.models.build import abstract_network, count_params
    from keyface_jax.models.keyface import build_network
    from keyface_jax.train import objective_config
    from keyface_jax.data.synthetic_batches import SyntheticBatches
    from keyface_jax.training.metrics import compiled_flops, peak_flops_per_device
    from keyface_jax.training.optimizer import make_optimizer
    from keyface_jax.training.state import init_train_state
    from keyface_jax.training.trainable import split_network
    from keyface_jax.training.step import make_train_step

    config = _keyframe_config(args.variant, args.batch, args.frames)
    config.model.dtype = args.dtype
    config.model.remat = args.remat
    net_cfg = network_config(config.model)
    tx, schedule = make_optimizer(config.optim)
    graphdef, _, _ = split_network(abstract_network(net_cfg), config.trainable)

    def create():
        trainable, frozen = split_network(build_network(net_cfg, rngs=nnx.Rngs(0)), config.trainable)[1:]
        return init_train_state(trainable, frozen, tx, 0, ema=False)

    state = jax.block_until_ready(jax.jit(create)())
    host_batch = SyntheticBatches(net_cfg, args.batch, args.frames, 0).global_batch_at(0)
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
    step = jax.jit(make_train_step(graphdef, objective_config(config), tx, schedule), donate_argnums=(0,))
    lowered = step.lower(state, batch, {})
    flops = compiled_flops(lowered)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, {})
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
        print(f"step {i + 1}/{args.warmup + args.steps}: {time.perf_counter() - start:.3f} s, "
              f"loss {float(metrics['loss']):.4f}", flush=True)

    device = jax.devices()[0]
    peak = peak_flops_per_device(args.peak, device)
    seconds = statistics.median(times)
    stats = device.memory_stats() or {}
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=device.device_kind, platform=device.platform, jax=jax.__version__,
        variant=args.variant, batch=args.batch, frames=args.frames, dtype=args.dtype, remat=args.remat,
        params=count_params(state.params), compile_s=compile_s, step_s_median=seconds,
        step_s_all=times, examples_per_s=args.batch / seconds, flops_per_step=flops,
        achieved_flops_per_s=flops / seconds if flops else None, peak_flops_per_s=peak,
        mfu=flops / seconds / peak if flops and peak else None,
        peak_memory_bytes=stats.get("peak_bytes_in_use"), memory_limit_bytes=stats.get("bytes_limit"),
        losses=losses)
    print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "step_s_all")}, indent=1))
    kind = re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")
    path = RESULTS / f"train_step_{kind}_{args.variant}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
