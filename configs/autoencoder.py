"""Autoencoder training: the SVD-architecture VAE (kl-f8 encoder + temporal decoder) on video frames.

    python -m keyface_jax.train --config=configs/autoencoder.py:tiny --workdir=runs/ae \\
        --config.data.videos=demo/videos

The architecture is the `autoencoder` section the diffusion configs of the same variant use, so
`runs/ae/export` plugs into `data_pipelines.prepare --vae` and `config.init.autoencoder`.
Extra `key=value` args as in the other configs: `tiny,seed=3`.
"""

import ml_collections

from configs import common

# Per-variant run lengths. tiny: whole 128-px demo frames, 2 per step. On the demo's frames (face-
# aligned crops), 200 steps reach 26.6 dB PSNR and keep 0.18× the face's sharpness (variance of
# the Laplacian); 400 steps with the edge loss 31.9 dB and 0.54× (2026-12-06, see README).
STEPS = {"tiny": 400, "small": 20_000, "full": 100_000}
BATCH_SIZE = {"tiny": 2, "small": 16, "full": 64}
LR = {"tiny": 2e-3, "small": 2e-4, "full": 4.5e-6 * 64}  # full: SD's base lr × batch


def get_config(arg: str = "tiny"):
    args = common.parse_arg(arg)
    variant = args["variant"]
    config = ml_collections.ConfigDict()
    config.task = "autoencoder"   # keyface_jax.train dispatches on this
    config.variant = variant
    config.autoencoder = common.autoencoder_section(variant)
    config.seed = int(args.get("seed", 0))
    # One value for the run length and the schedule's length: overriding train.steps stretches the
    # cosine decay instead of leaving the learning rate at 0 after the old length.
    steps = ml_collections.FieldReference(STEPS[variant])
    config.optim = ml_collections.ConfigDict(dict(
        lr=LR[variant], b1=0.5 if variant == "full" else 0.9, b2=0.9 if variant == "full" else 0.999,
        eps=1e-8, weight_decay=0.0, warmup_steps=20 if variant == "tiny" else 500,
        schedule="cosine", total_steps=steps, grad_clip=1.0, accum_steps=1, ema_decay=0.0))
    config.loss = ml_collections.ConfigDict(dict(
        reconstruction="l1",          # l1 | l2, per pixel in [-1, 1]
        reconstruction_weight=1.0,
        kl_weight=1e-6,               # on the mean per-latent-element KL to N(0, 1)
        lpips_weight=0.0,             # needs both LPIPS weight files (none ship offline)
        # L1 on pixel differences (edges; losses/reconstruction). tiny: at 400 steps it raises the
        # kept face sharpness from 0.47× to 0.54× (PSNR 31.4 → 31.9 dB)
        gradient_weight=1.0 if variant == "tiny" else 0.0,
        lpips_vgg_weights="", lpips_lin_weights="",
    ))
    config.mesh = common.mesh_section(data=-1)
    config.train = ml_collections.ConfigDict(dict(
        batch_size=BATCH_SIZE[variant],
        steps=steps,
        log_every=10,
        checkpoint_every=50 if variant == "tiny" else 1000,
        keep_checkpoints=2,
        nan_policy="stop",            # stop | skip
        profile_steps=(),
        peak_flops_per_device=0.0,
        eval_frames=16,               # full frames scored (PSNR) at the end of each run; 0 = off
        normalize_latents=True,       # export at SVD's latent scale (std 1/0.18215 on the eval frames)
    ))
    config.data = ml_collections.ConfigDict(dict(
        videos="",                    # a folder of videos (mp4, mov, mkv, ...)
        fps=25.0,
        # Random square crops (0 = whole frames). Whole 128-px frames beat 64-px crops of the same
        # pixel count per step by 5 dB after 150 steps: the mid attention and GroupNorm statistics
        # then see the frame size they are evaluated at.
        crop_size=0 if variant == "tiny" else 256,
        clip_frames=1,                # consecutive frames decoded together (see the trainer)
        flip=True,                    # random horizontal flips
        frame_stride=1,               # keep every n-th frame (long corpora)
        max_frames_per_video=0,       # 0 = all
        prefetch=2, device_prefetch=2,  # batches buffered on the host / on the devices
    ))
    config.init = ml_collections.ConfigDict(dict(
        autoencoder="",               # start from an Orbax export (e.g. to adapt to a new domain)
    ))
    return config
