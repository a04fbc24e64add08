"""Shared variant tables for the KeyFace configs (plain data: no model code is imported here).

Variants:
- `tiny`:  a few hundred thousand parameters, 16×16 latents; a forward pass in seconds on CPU.
- `small`: a one-accelerator model (about 1/4 width of the paper's).
- `full`:  the paper's sizes (SVD UNet, 512 px → 64×64 latents, 1536-d audio tokens).
"""

import ml_collections

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
        dtype="float32",
        param_dtype="float32",
        remat=False,
        remat_policy="",
    ))


def base_config(kind: str, arg: str) -> ml_collections.ConfigDict:
    args = parse_arg(arg)
    variant = args["variant"]
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.model = model_config(kind, variant)
    config.autoencoder = ml_collections.ConfigDict(dict(
        AUTOENCODER_VARIANTS[variant], in_channels=3, out_channels=3, latent_channels=4,
        use_quant_conv=True, image_size=8 * LATENT_SIZE[variant]))
    config.num_frames = int(args.get("frames", 14))
    config.seed = int(args.get("seed", 0))
    return config
