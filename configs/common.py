"""Shared variant tables for the KeyFace configs (plain data: no model code is imported here).

Variants:
- `tiny`:  a few hundred thousand parameters, 16×16 latents; a forward pass in seconds on CPU.
- `small`: a one-accelerator model (about 1/4 width of the paper's).
- `full`:  the paper's sizes (SVD UNet, 512 px → 64×64 latents, 1536-d audio tokens).
"""

import ml_collections

from configs.axis_rules import LOGICAL_AXIS_RULES  # noqa: F401  (copied into config.mesh.rules)

# UNet width/depth per variant; everything else follows the paper (spec §2.1).
UNET_VARIANTS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=(1, 1), num_heads=(1, 2),
                 down_attention=(True, True), up_attention=(True, True), context_dim=64),
    "small": dict(block_out_channels=(96, 192, 384, 384), layers_per_block=(2, 2, 2, 2),
                  num_heads=(3, 6, 12, 12), down_attention=(True, True, True, False),
                  up_attention=(True, True, True, False), context_dim=512),
    "full": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=(2, 2, 2, 2),
                 num_heads=(5, 10, 20, 20), down_attention=(True, True, True, False),
                 up_attention=(True, True, True, False), context_dim=1024),
}
LATENT_SIZE = {"tiny": 16, "small": 32, "full": 64}
# SVD autoencoder (SD kl-f8 encoder + temporal decoder); 8× spatial downsampling in every variant.
AUTOENCODER_VARIANTS = {
    "tiny": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
    "small": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    "full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
}
AUDIO_DIM = {"tiny": 32, "small": 1536, "full": 1536}

# Attention backends (keyface_jax/models/attention_backends.py): auto | xla | chunked | cudnn | splash.
ATTENTION_DEFAULTS = dict(
    attention="auto",
    attention_min_seq_length=1024,   # shorter query or key sequences always use the plain `xla` form
    attention_chunk_size=512,        # query/key block of the memory-efficient `chunked` form
)


def parse_arg(arg: str) -> dict:
    """'full,frames=14' → {'variant': 'full', 'frames': '14'} (big_vision-style config args)."""
    out = {"variant": "tiny"}
    for i, part in enumerate(p for p in (arg or "").split(",") if p):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = value.strip()
        elif i == 0:
            out["variant"] = part.strip()
        else:
            raise ValueError(f"config arg {arg!r}: {part!r} is neither the variant nor key=value")
    return out


def model_config(kind: str, variant: str) -> ml_collections.ConfigDict:
    """The `model` section: network kind, UNet architecture, audio and latent sizes."""
    if variant not in UNET_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(UNET_VARIANTS)}")
    unet = dict(UNET_VARIANTS[variant])
    levels = len(unet["block_out_channels"])
    context = unet["context_dim"]
    unet.update(
        in_channels=8 if kind == "keyframe" else 9,
        out_channels=4,
        transformer_depth=(1,) * levels,
        mid_transformer_depth=1,
        mid_num_heads=unet["num_heads"][-1],
        adm_in_channels=context + (512 if kind == "keyframe" else 0),
    )
    return ml_collections.ConfigDict(dict(
        kind=kind,
        unet=unet,
        audio_dim=AUDIO_DIM[variant],
        audio_tokens_per_frame=2,
        latent_channels=4,
        latent_size=LATENT_SIZE[variant],
        # full: bf16 compute on fp32 master weights, each UNet block rematerialised in the backward
        # (keyface_jax/models/remat.py names the policies)
        dtype="bfloat16" if variant == "full" else "float32",
        param_dtype="float32",
        remat=variant == "full",
        remat_policy="block" if variant == "full" else "",
        **ATTENTION_DEFAULTS,
    ))


def autoencoder_section(variant: str) -> ml_collections.ConfigDict:
    """The `autoencoder` section (architecture + the frame size it encodes), shared by the
    diffusion configs (frozen decoder, data preparation) and configs/autoencoder.py (training it)."""
    if variant not in AUTOENCODER_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(AUTOENCODER_VARIANTS)}")
    return ml_collections.ConfigDict(dict(
        AUTOENCODER_VARIANTS[variant], in_channels=3, out_channels=3, latent_channels=4,
        use_quant_conv=True, image_size=8 * LATENT_SIZE[variant],
        attention="auto"))             # backend of the mid-block attention (one head, wide)


def mesh_section(**sizes) -> ml_collections.ConfigDict:
    """The `mesh` section: per-slice axis sizes (one may be -1: the devices left over), sizes across
    slices (`dcn`, multi-slice jobs) and the logical axis rules."""
    axes = dict(data=1, fsdp=1, context=1, tensor=1)
    unknown = set(sizes) - set(axes)
    if unknown:
        raise ValueError(f"mesh_section: unknown mesh axes {sorted(unknown)}")
    return ml_collections.ConfigDict(dict(
        axes, **sizes, dcn=dict(axes), rules=dict(LOGICAL_AXIS_RULES)))


def base_config(kind: str, arg: str) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    variant = args["variant"]
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model = model_config(kind, variant)
    config.autoencoder = autoencoder_section(variant)
    config.num_frames = int(args.get("frames", 14))
    config.seed = int(args.get("seed", 0))
    add_training_sections(config, kind, variant)
    return config


# Global batch per variant: tiny runs on 2 CPU cores; full is the per-replica 1 of the reference
# times a pod's worth of data parallelism (set on the command line for the real job).
BATCH_SIZE = {"tiny": 4, "small": 8, "full": 32}


def add_training_sections(config, kind: str, variant: str) -> None:
    """optim / objective / trainable / mesh / train / data / init sections (spec §4 defaults)."""
    # One value for the run length and the schedule's length: overriding train.steps stretches a
    # cosine decay instead of leaving the learning rate at 0 after the old length.
    steps = ml_collections.FieldReference(100_000 if variant == "full" else 300)
    config.optim = ml_collections.ConfigDict(dict(
        lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,  # the reference's AdamW
        warmup_steps=0 if variant == "full" else 20,
        # constant for every size: on the demo (one seed, same data and autoencoder) cosine
        # decay to 0 over its 300 steps cut lip sync from r = 0.30 to 0.13 on held-out TTS
        # speech and 0.36 to 0.13 on the JFK recording (final interpolation loss 0.21 vs 0.30)
        schedule="constant",          # constant | cosine (after warm-up)
        total_steps=steps,
        grad_clip=0.0,                # global-norm clip; 0 = off
        accum_steps=1,                # micro-batches per update (scan inside one jitted step)
        ema_decay=0.0,                # 0 = no EMA copy of the weights
    ))
    if variant != "full":
        config.optim.lr = 3e-4        # small models from scratch learn in hundreds of steps
    config.objective = ml_collections.ConfigDict(dict(
        p_mean=1.0, p_std=1.2,
        lambda_lower=3.0 if kind == "keyframe" else 2.0,
        # () = off (KeyFace); (top, bottom, left, right) fractions: × lambda_mouth there
        mouth_box=(), lambda_mouth=1.0,
        cond_drop_rate=0.1, audio_drop_rate=0.2,
        # pixel losses need the frozen VAE decoder (and LPIPS weight files); off for the tiny runs
        pixel_weight=1.0 if (kind == "keyframe" and variant == "full") else 0.0,
        pixel_losses=("l2", "lpips") if kind == "keyframe" else (),
        pixel_frames=1,
        lpips_vgg_weights="", lpips_lin_weights="",
    ))
    config.trainable = ml_collections.ConfigDict(dict(
        preset="reference" if variant == "full" else "all", freeze=(), unfreeze=()))
    config.mesh = mesh_section(fsdp=-1)
    config.train = ml_collections.ConfigDict(dict(
        batch_size=BATCH_SIZE[variant],
        steps=steps,
        log_every=10,
        checkpoint_every=100 if variant != "full" else 1000,
        keep_checkpoints=3,
        nan_policy="stop",            # stop | skip
        profile_steps=(),             # (first, last) step of a jax.profiler trace window
        preview_every=0,              # steps between preview samples (0 = off)
        peak_flops_per_device=0.0,    # 0 = look up the device kind in the peak table
    ))
    config.data = ml_collections.ConfigDict(dict(
        path="",                      # a prepared dataset folder (data_pipelines.prepare)
        group_weights={},             # group name → sampling weight
        # keyface_jax.data.pipeline.DataConfig fields, same names: Grain worker processes
        # (0 = read in this process) and their buffers, reader threads, batches buffered on the
        # host and, already copied, on the devices (both 0 = every batch synchronous).
        worker_count=0, worker_buffer=2, read_threads=2, prefetch=2, device_prefetch=2,
    ))
    config.init = ml_collections.ConfigDict(dict(
        source="",                    # "" (random) | svd | reference | orbax
        path="",
        autoencoder="",               # weights of the frozen VAE decoder for the pixel losses
    ))
