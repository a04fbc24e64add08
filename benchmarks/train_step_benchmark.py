"""One KeyFace keyframe training step on CPU: our JAX step against an equivalent PyTorch/diffusers step.

    .venv/bin/python benchmarks/train_step_benchmark.py                    # tiny + small
    .venv/bin/python benchmarks/train_step_benchmark.py --quick            # tiny only, 4 frames
    .venv/bin/python benchmarks/train_step_benchmark.py --variants small --batch 1 --frames 4

JAX side: the real train step (`make_train_step` with the keyframe ObjectiveConfig of the config,
AdamW from `make_optimizer`, trainable preset "all", no EMA), jitted with the state donated, on one
CPU device, fed a `SyntheticBatches` batch of the config's shapes. FLOPs per step come from XLA's
cost analysis of the lowered program (`jax.jit(step).lower(...).cost_analysis()`).

PyTorch side, the same work in eager fp32:
  - diffusers `UNetSpatioTemporalConditionModel` built from `diffusers_config_from_unet(net_cfg.unet)`
    (same channels, levels, layers, heads, context and label widths) and an audio projection
    `nn.Linear(audio_dim, context_dim)`;
  - the keyframe network's inputs (keyface_jax/models/keyface.py): noisy latent × c_in concatenated
    with the raw identity latent (÷ 0.18215, CFG-dropped per sample) broadcast over the frames;
    audio context = projection of the mean of each frame's tokens (zeroed for dropped samples) as the
    cross-attention context; per-frame label y = [sinusoid(valence) 256 | sinusoid(arousal) 256 |
    audio context] through diffusers' `add_embedding` MLP;
  - the v-scaled EDM loss of keyface_jax/diffusion/objective.py (σ ~ logN(p_mean, p_std) per clip,
    c_skip/c_out/c_in/c_noise, λ(σ)·row-weighted L2 with `lambda_lower` on the lower latent rows);
  - `torch.optim.AdamW` (the config's lr/betas/eps/weight decay) and the global gradient norm.
  Differences, none of which changes the work materially:
  - diffusers' forward adds ONE `added_time_ids` embedding per clip; KeyFace's y differs per frame,
    so the torch step runs diffusers' own blocks through `diffusers_forward` below (a copy of
    `UNetSpatioTemporalConditionModel.forward` in which `add_embedding` runs on the [B·T, adm]
    per-frame labels), exactly the label path of our VideoUNet;
  - diffusers repeats the context per frame (and per pixel in the temporal blocks) before the k/v
    projections; our network folds frames (pixels) into the query length so k/v are projected once
    per clip. The attention products are the same; diffusers projects k/v T (H·W) times;
  - the JAX step also evaluates its stop-on-NaN select (`where(finite, new, old)`) over parameters
    and moments; torch computes the finite flag but applies the update unconditionally;
  - the learning-rate warm-up schedule is a constant lr in torch (a scalar either way);
  - GroupNorm eps values of a few diffusers blocks are 1e-6 instead of 1e-5 (no cost difference).

Protocol: the parent starts one worker process per framework (this file with --worker jax|torch), with
the same thread count (`torch.set_num_threads(threads)`; XLA's CPU thread pool is sized by the CPUs
the process may run on, so with --threads below the machine's core count both workers are pinned to
the same first `threads` CPUs with sched_setaffinity). The JAX worker builds, compiles and writes the
synthetic batch to a temporary .npz that the torch worker then loads. Timed steps then alternate
J T J T ..., one step each, with a short pause between, so that load from other processes on a
shared machine hits both sides alike; medians are reported, with the speed-up torch time / JAX time
(> 1: JAX faster) and, per round, the same ratio of the two adjacent steps. The torch worker runs with
OMP_WAIT_POLICY=PASSIVE (--torch-omp-wait). Each worker also times a large fp32
matmul (the same size in jax and torch, alternated the same way); the better of the two is the
"measured peak" used for MFU (the device peak table has no CPU entry).

Writes benchmarks/results/train_step_cpu.json (`--quick`: train_step_cpu_quick.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_BATCH = {"tiny": 4, "small": 1, "full": 1}
DEFAULT_FRAMES = {"tiny": 14, "small": 4, "full": 2}
PEAK_MATMUL_N = 2048
PREFIX = "@@"  # marks protocol lines on a worker's stdout (libraries may print too)


# ----------------------------------------------------------------------------- worker plumbing


def _reply(obj) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _pin_threads(threads: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])


def _serve(handlers: dict) -> None:
    """Answers one JSON command per stdin line until 'quit'."""
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "quit":
            _reply({"ok": True, "max_rss_mb": _max_rss_mb()})
            return
        _reply(handlers[name](**command))


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _keyframe_config(variant: str, batch: int, frames: int):
    from configs import keyframe

    config = keyframe.get_config(f"{variant},frames={frames}")
    config.train.batch_size = batch
    config.trainable.preset = "all"
    config.optim.ema_decay = 0.0
    config.optim.accum_steps = 1
    if config.objective.pixel_weight > 0:  # the full variant's pixel losses need VAE/LPIPS weights
        config.objective.pixel_weight = 0.0
    return config


# ----------------------------------------------------------------------------- JAX worker


def jax_worker(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from keyface_jax import cpu_allocator
    from keyface_jax.config_lib import network_config
    from keyface_jax.models.build import abstract_network, count_params
    from keyface_jax.models.keyface import build_network
    from keyface_jax.train import objective_config
    from keyface_jax.data.synthetic_batches import SyntheticBatches
    from keyface_jax.training.metrics import compiled_flops
    from keyface_jax.training.optimizer import make_optimizer
    from keyface_jax.training.state import init_train_state
    from keyface_jax.training.trainable import split_network
    from keyface_jax.training.step import make_train_step

    config = _keyframe_config(args.variant, args.batch, args.frames)
    net_cfg = network_config(config.model)
    objective = objective_config(config)
    tx, schedule = make_optimizer(config.optim)
    graphdef, _, _ = split_network(abstract_network(net_cfg), config.trainable)

    def create():
        net = build_network(net_cfg, rngs=nnx.Rngs(config.seed))
        trainable, frozen = split_network(net, config.trainable)[1:]
        return init_train_state(trainable, frozen, tx, config.seed, ema=False)

    t0 = time.perf_counter()
    state = jax.block_until_ready(jax.jit(create)())
    init_s = time.perf_counter() - t0
    n_params = count_params(state.params)

    host_batch = SyntheticBatches(net_cfg, args.batch, args.frames, config.seed).global_batch_at(0)
    np.savez(args.batch_file, **host_batch)
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}

    step = make_train_step(graphdef, objective, tx, schedule, accum_steps=1,
                           nan_policy=config.train.nan_policy)
    jitted = jax.jit(step, donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch, {})
    lower_s = time.perf_counter() - t0
    flops = compiled_flops(lowered)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    compiled_cost = compiled.cost_analysis()
    compiled_cost = compiled_cost[0] if isinstance(compiled_cost, (list, tuple)) else compiled_cost
    compiled_flops_value = float((compiled_cost or {}).get("flops", float("nan")))
    memory = compiled.memory_analysis()
    memory = {k: int(getattr(memory, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                   "alias_size_in_bytes", "temp_size_in_bytes")
              if memory is not None and hasattr(memory, k)}

    holder = {"state": state}
    losses = []

    def run_step():
        new_state, metrics = compiled(holder["state"], batch, {})
        jax.block_until_ready((new_state, metrics))
        holder["state"] = new_state
        losses.append(float(metrics["loss"]))

    def step_cmd():
        return {"seconds": _time_call(run_step), "loss": losses[-1]}

    n = args.peak_n
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(matmul(a, b))

    def peak_cmd():
        seconds = _time_call(lambda: jax.block_until_ready(matmul(a, b)))
        return {"seconds": seconds, "flops": 2.0 * n ** 3}

    _reply(dict(ready=True, framework="jax", version=jax.__version__, params=n_params,
                init_s=init_s, lower_s=lower_s, compile_s=compile_s, flops_per_step=flops,
                compiled_flops_per_step=compiled_flops_value, memory_analysis=memory,
                xla_flags=os.environ.get("XLA_FLAGS", ""), tcmalloc=cpu_allocator.is_active(),
                affinity=sorted(os.sched_getaffinity(0)), device=str(jax.devices()[0])))
    _serve({"step": step_cmd, "peak": peak_cmd})


# ----------------------------------------------------------------------------- PyTorch worker


def _sinusoid(torch, t, dim: int, max_period: float = 10000.0):
    """[cos | sin] embedding of t [...] → [..., dim] (keyface_jax.models.layers.timestep_embedding)."""
    import math

    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def diffusers_forward(unet, sample, c_noise, context, y):
    """`UNetSpatioTemporalConditionModel.forward` with a per-frame label: sample [B, T, C, H, W],
    c_noise [B], context [B, S, D], y [B, T, adm] → [B, T, C_out, H, W]. Identical to diffusers'
    forward except that `add_embedding` runs per frame on y instead of once per clip on the
    sinusoids of `added_time_ids` (KeyFace's y differs per frame)."""
    import torch

    b, t = sample.shape[:2]
    emb = unet.time_embedding(unet.time_proj(c_noise).to(sample.dtype))            # [B, E]
    emb = emb.repeat_interleave(t, dim=0) + unet.add_embedding(y.reshape(b * t, -1))
    context = context.repeat_interleave(t, dim=0)
    sample = unet.conv_in(sample.flatten(0, 1))
    indicator = torch.zeros(b, t, dtype=sample.dtype)

    skips = (sample,)
    for block in unet.down_blocks:
        kwargs = dict(hidden_states=sample, temb=emb, image_only_indicator=indicator)
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = context
        sample, res = block(**kwargs)
        skips += res
    sample = unet.mid_block(hidden_states=sample, temb=emb, encoder_hidden_states=context,
                            image_only_indicator=indicator)
    for block in unet.up_blocks:
        res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
        kwargs = dict(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                      upsample_size=None, image_only_indicator=indicator)
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = context
        sample = block(**kwargs)
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    return sample.reshape(b, t, *sample.shape[1:])


def make_torch_step(variant: str, batch: int, frames: int, batch_file: str, adamw: str = "foreach"):
    """The PyTorch training step on the batch in `batch_file`: (run_step() → (loss, finite), info)."""
    import numpy as np
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from keyface_jax.conversion.diffusers_unet import diffusers_config_from_unet
    from keyface_jax.config_lib import network_config
    from keyface_jax.models.autoencoder import SCALE_FACTOR
    from keyface_jax.models.keyface import EMOTION_EMBED_DIM

    torch.manual_seed(0)
    config = _keyframe_config(variant, batch, frames)
    net_cfg = network_config(config.model)
    obj, optim = config.objective, config.optim

    unet_cfg = dict(diffusers_config_from_unet(net_cfg.unet), num_frames=frames,
                    sample_size=net_cfg.latent_size)
    unet = UNetSpatioTemporalConditionModel(**unet_cfg).train()
    audio_proj = torch.nn.Linear(net_cfg.audio_dim, net_cfg.unet.context_dim)
    params = list(unet.parameters()) + list(audio_proj.parameters())
    kind = {"fused": dict(fused=True), "foreach": dict(foreach=True),
            "for-loop": dict(foreach=False)}[adamw]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                            weight_decay=optim.weight_decay, **kind)

    host = dict(np.load(batch_file))
    # Channels-last numpy [B, T, h, w, c] → diffusers' [B, T, c, h, w], once, outside the step.
    x0 = torch.from_numpy(host["latents"]).permute(0, 1, 4, 2, 3).contiguous()
    identity = torch.from_numpy(host["identity"]).permute(0, 3, 1, 2).contiguous()
    audio = torch.from_numpy(host["audio"])
    valence, arousal = torch.from_numpy(host["valence"]), torch.from_numpy(host["arousal"])
    b, t, _, h, _ = x0.shape
    rows = torch.where(torch.arange(h) >= h // 2, obj.lambda_lower, 1.0).float()
    gen = torch.Generator().manual_seed(0)

    def run_step():
        # Randomness of the step (objective.draw_randomness).
        sigma = torch.exp(obj.p_mean + obj.p_std * torch.randn(b, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        cond_keep = (torch.rand(b, generator=gen) >= obj.cond_drop_rate).float()
        audio_keep = (torch.rand(b, generator=gen) >= obj.audio_drop_rate).float()
        # v-scaled EDM preconditioning (scalings.vscaling, σ_data = 1).
        var = sigma ** 2 + 1.0
        c_skip, c_out, c_in = 1.0 / var, -sigma * torch.rsqrt(var), torch.rsqrt(var)
        c_noise = 0.25 * torch.log(sigma)
        per = lambda v: v.view(b, 1, 1, 1, 1)
        x_noisy = x0 + per(sigma) * noise
        # KeyframeNet: identity concat, audio context, per-frame label y.
        ident = (identity / SCALE_FACTOR) * cond_keep.view(b, 1, 1, 1)
        x_in = torch.cat([per(c_in) * x_noisy, ident[:, None].expand(b, t, *ident.shape[1:])], dim=2)
        context = audio_proj(audio.mean(dim=2)) * audio_keep.view(b, 1, 1)
        y = torch.cat([_sinusoid(torch, valence, EMOTION_EMBED_DIM),
                       _sinusoid(torch, arousal, EMOTION_EMBED_DIM), context], dim=-1)
        f = diffusers_forward(unet, x_in, c_noise, context, y)
        denoised = per(c_skip) * x_noisy + per(c_out) * f
        # λ(σ)·row-weighted L2 per frame, mean over frames (objective.diffusion_l2).
        sq = torch.square(denoised - x0) * rows.view(1, 1, 1, h, 1)
        lam = (sigma ** 2 + 1.0) / sigma ** 2
        loss = (lam[:, None] * sq.mean(dim=(2, 3, 4))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
        opt.step()
        return float(loss.detach()), finite

    return run_step, dict(params=sum(p.numel() for p in params))


def torch_worker(args) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from keyface_jax import cpu_allocator

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # XLA's CPU threads run with denormals flushed too
    t0 = time.perf_counter()
    run_step, info = make_torch_step(args.variant, args.batch, args.frames, args.batch_file,
                                     args.torch_adamw)
    init_s = time.perf_counter() - t0
    losses = []

    def step_cmd():
        seconds = _time_call(lambda: losses.append(run_step()))
        return {"seconds": seconds, "loss": losses[-1][0], "finite": losses[-1][1]}

    def flops_cmd():
        """FLOPs of one step as torch's FlopCounterMode counts them (matmuls, convolutions and
        attention only; elementwise work is not counted)."""
        counter = FlopCounterMode(display=False)
        with counter:
            losses.append(run_step())
        return {"flops": float(counter.get_total_flops())}

    n = args.peak_n
    gen = torch.Generator().manual_seed(1)
    a, bm = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    torch.mm(a, bm)

    def peak_cmd():
        return {"seconds": _time_call(lambda: torch.mm(a, bm)), "flops": 2.0 * n ** 3}

    _reply(dict(ready=True, framework="torch", version=torch.__version__, params=info["params"],
                init_s=init_s, threads=torch.get_num_threads(), adamw=args.torch_adamw,
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", ""),
                tcmalloc=cpu_allocator.is_active(), affinity=sorted(os.sched_getaffinity(0))))
    _serve({"step": step_cmd, "peak": peak_cmd, "flops": flops_cmd})


# ----------------------------------------------------------------------------- parent


class Worker:
    def __init__(self, framework: str, variant: str, batch: int, frames: int, threads: int,
                 batch_file: str, extra: list[str], env: dict):
        cmd = [sys.executable, __file__, "--worker", framework, "--variants", variant,
               "--batch", str(batch), "--frames", str(frames), "--threads", str(threads),
               "--batch-file", batch_file, *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=str(ROOT))

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited with code {self.proc.wait()}")
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
            sys.stderr.write(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        try:
            return self.ask("quit")
        finally:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _torch_env(env: dict, omp_wait: str) -> dict:
    """The torch worker's environment: OMP_WAIT_POLICY must be set before libgomp starts."""
    env = dict(env)
    if omp_wait != "default":
        env["OMP_WAIT_POLICY"] = omp_wait.upper()
    return env


def _allocator_env(env: dict, allocator: str) -> dict:
    """A worker's environment with tcmalloc preloaded (if installed) or glibc malloc."""
    from keyface_jax.cpu_allocator import with_tcmalloc, without_preload
    return with_tcmalloc(env) if allocator == "tcmalloc" else without_preload(env)


def bench_variant(variant: str, batch: int, frames: int, args) -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    extra = ["--torch-adamw", args.torch_adamw, "--peak-n", str(args.peak_n)]
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = os.path.join(tmp, "batch.npz")
        print(f"[{variant}] building and compiling the JAX step (batch {batch}, {frames} frames)...",
              flush=True)
        jw = Worker("jax", variant, batch, frames, args.threads, batch_file, extra,
                    _allocator_env(env, args.jax_allocator))
        try:
            jax_info = jw.read()
            print(f"[{variant}] JAX compiled in {jax_info['compile_s']:.1f} s; building torch...",
                  flush=True)
            tw = Worker("torch", variant, batch, frames, args.threads, batch_file, extra,
                        _torch_env(_allocator_env(env, args.torch_allocator), args.torch_omp_wait))
            try:
                torch_info = tw.read()
                times = {"jax": [], "torch": []}
                losses = {"jax": [], "torch": []}
                peaks = {"jax": [], "torch": []}
                for _ in range(args.warmup):
                    for name, w in (("jax", jw), ("torch", tw)):
                        w.ask("step")
                        time.sleep(args.pause)
                for i in range(args.steps):
                    order = (("jax", jw), ("torch", tw)) if i % 2 == 0 else (("torch", tw), ("jax", jw))
                    for name, w in order:
                        r = w.ask("step")
                        times[name].append(r["seconds"])
                        losses[name].append(r["loss"])
                        time.sleep(args.pause)
                    print(f"[{variant}] step {i + 1}/{args.steps}: jax {times['jax'][-1]:.3f} s, "
                          f"torch {times['torch'][-1]:.3f} s", flush=True)
                for _ in range(args.peak_reps):
                    for name, w in (("jax", jw), ("torch", tw)):
                        r = w.ask("peak")
                        peaks[name].append(r["flops"] / r["seconds"])
                        time.sleep(args.pause)
                torch_counted_flops = tw.ask("flops")["flops"]  # an untimed extra step
            finally:
                torch_rss = tw.close().get("max_rss_mb")
        finally:
            jax_rss = jw.close().get("max_rss_mb")

    jax_s, torch_s = _median(times["jax"]), _median(times["torch"])
    peak_by = {k: max(v) for k, v in peaks.items()}
    peak = max(peak_by.values())
    flops = jax_info["flops_per_step"]
    return dict(
        batch=batch, frames=frames, threads=args.threads,
        params=dict(jax=jax_info["params"], torch=torch_info["params"]),
        jax=dict(compile_s=jax_info["compile_s"], lower_s=jax_info["lower_s"],
                 init_s=jax_info["init_s"], step_s_median=jax_s, step_s_min=min(times["jax"]),
                 examples_per_s=batch / jax_s, flops_per_step=flops,
                 flops_per_step_compiled=jax_info["compiled_flops_per_step"],
                 achieved_flops_per_s=flops / jax_s, mfu_vs_measured_peak=flops / jax_s / peak,
                 memory_analysis=jax_info["memory_analysis"], max_rss_mb=jax_rss,
                 xla_flags=jax_info["xla_flags"], tcmalloc=jax_info["tcmalloc"],
                 affinity=jax_info["affinity"],
                 version=jax_info["version"], losses=losses["jax"]),
        torch=dict(init_s=torch_info["init_s"], step_s_median=torch_s,
                   step_s_min=min(times["torch"]), examples_per_s=batch / torch_s,
                   achieved_flops_per_s_at_jax_flops=flops / torch_s,
                   mfu_vs_measured_peak_at_jax_flops=flops / torch_s / peak,
                   threads=torch_info["threads"], adamw=torch_info["adamw"],
                   omp_wait_policy=torch_info["omp_wait_policy"], tcmalloc=torch_info["tcmalloc"],
                   flop_counter_mode_flops_per_step=torch_counted_flops, max_rss_mb=torch_rss,
                   affinity=torch_info["affinity"], version=torch_info["version"],
                   losses=losses["torch"]),
        speedup_torch_over_jax=torch_s / jax_s,
        ratio_jax_over_torch=jax_s / torch_s,
        speedup_per_round=[t / j for j, t in zip(times["jax"], times["torch"])],
        peak=dict(matmul_n=args.peak_n, flops_per_s=peak, best_by_framework=peak_by,
                  all_flops_per_s=peaks),
        all_step_times_s=times,
    )


def _print_table(results: dict) -> None:
    head = (f"{'variant':8} {'B×T':>6} {'params':>9} {'compile s':>9} {'JAX step s':>10} "
            f"{'torch step s':>12} {'torch/JAX':>9} {'JAX ex/s':>9} {'GFLOP/step':>10} "
            f"{'GFLOP/s':>8} {'peak GF/s':>9} {'MFU':>6}")
    print(head)
    print("-" * len(head))
    for variant, r in results.items():
        j = r["jax"]
        print(f"{variant:8} {r['batch']}×{r['frames']:<4} {r['params']['jax'] / 1e6:8.2f}M "
              f"{j['compile_s']:9.1f} {j['step_s_median']:10.3f} {r['torch']['step_s_median']:12.3f} "
              f"{r['speedup_torch_over_jax']:9.3f} {j['examples_per_s']:9.2f} "
              f"{j['flops_per_step'] / 1e9:10.2f} {j['achieved_flops_per_s'] / 1e9:8.1f} "
              f"{r['peak']['flops_per_s'] / 1e9:9.1f} {100 * j['mfu_vs_measured_peak']:5.1f}%")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="tiny,small", help="comma-separated config variants")
    p.add_argument("--batch", type=int, default=None,
                   help=f"clips per step (default per variant: {DEFAULT_BATCH})")
    p.add_argument("--frames", type=int, default=None,
                   help=f"frames per clip (default per variant: {DEFAULT_FRAMES})")
    p.add_argument("--steps", type=int, default=10, help="timed steps per framework")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework first")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="compute threads of both frameworks")
    p.add_argument("--quick", action="store_true", help="tiny only, 4 frames, 4 steps")
    p.add_argument("--pause", type=float, default=0.05, help="seconds between alternated steps")
    p.add_argument("--peak-n", type=int, default=PEAK_MATMUL_N, help="matmul size for the peak")
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--torch-adamw", default="foreach", choices=("fused", "foreach", "for-loop"),
                   help="torch AdamW implementation")
    p.add_argument("--torch-omp-wait", default="passive", choices=("passive", "active", "default"),
                   help="OMP_WAIT_POLICY of the torch worker: spinning OpenMP threads collapse on "
                        "an oversubscribed machine (passive keeps torch fast there)")
    p.add_argument("--jax-allocator", default="tcmalloc", choices=("tcmalloc", "glibc"),
                   help="malloc of the JAX worker (tcmalloc: preloaded if installed; see "
                        "keyface_jax/cpu_allocator.py)")
    p.add_argument("--torch-allocator", default="glibc", choices=("tcmalloc", "glibc"),
                   help="malloc of the torch worker (glibc measured faster for eager torch here)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        _pin_threads(args.threads)
        args.variant = args.variants
        (jax_worker if args.worker == "jax" else torch_worker)(args)
        return
    variants = ["tiny"] if args.quick else [v for v in args.variants.split(",") if v]
    if args.quick:
        args.steps = min(args.steps, 4)
    results = {}
    load_start = os.getloadavg()
    for variant in variants:
        batch = args.batch or DEFAULT_BATCH[variant]
        frames = args.frames or (4 if args.quick else DEFAULT_FRAMES[variant])
        results[variant] = bench_variant(variant, batch, frames, args)
    _print_table(results)
    out = pathlib.Path(args.out) if args.out else RESULTS_DIR / (
        "train_step_cpu_quick.json" if args.quick else "train_step_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    out.write_text(json.dumps(dict(
        benchmark="train_step", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        cpu=cpu, cpu_count=os.cpu_count(), python=platform.python_version(),
        settings=dict(variants=variants, steps=args.steps, warmup=args.warmup, threads=args.threads,
                      quick=args.quick, torch_adamw=args.torch_adamw,
                      torch_omp_wait_policy=args.torch_omp_wait, peak_matmul_n=args.peak_n,
                      jax_allocator=args.jax_allocator, torch_allocator=args.torch_allocator,
                      pause_s=args.pause),
        load_average_at_start=load_start, load_average_at_end=os.getloadavg(),
        notes=("step times are medians of alternated steps (J T / T J per round); MFU = XLA "
               "cost-analysis FLOPs of the JAX step / step time / measured fp32 matmul peak (best "
               "of jax and torch at the same threads); the torch MFU uses the same FLOP count."),
        results=results), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
