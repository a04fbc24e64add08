"""Numerical parity of our SVD autoencoder against diffusers' AutoencoderKLTemporalDecoder.

torch/diffusers are test-only dependencies: they are imported inside the functions.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from keyface_jax.conversion.diffusers_vae import (diffusers_vae_state_dict_to_sgm,
                                                  vae_config_from_diffusers)
from keyface_jax.conversion.nnx_torch import load_torch_state_dict
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.testing.torch_reference import relative_error, torch_state_dict_numpy


def _full_config(diffusers_config: Mapping[str, Any]) -> dict:
    cfg = dict(diffusers_config)
    cfg.setdefault("down_block_types", ("DownEncoderBlock2D",) * len(cfg["block_out_channels"]))
    return cfg


def make_random_diffusers_vae(diffusers_config: Mapping[str, Any], seed: int):
    """A diffusers AutoencoderKLTemporalDecoder (eval, fp32) with every parameter perturbed.

    Noise: 0.5 x the tensor's std for weight matrices/kernels (keeps activations O(1)), N(0, 0.1)
    for 1-D tensors (norm scales stay near 1, zero-initialised biases become non-zero) and N(0, 1)
    for `mix_factor` (so both branches of each blend matter and differ per block).
    If layers_per_block != 2, the decoder mid block is rebuilt with two resnets: diffusers ties
    its depth to layers_per_block (and skips the attention for 1), sgm always uses two.
    """
    import torch
    from diffusers import AutoencoderKLTemporalDecoder
    from diffusers.models.unets.unet_3d_blocks import MidBlockTemporalDecoder

    torch.manual_seed(seed)
    model = AutoencoderKLTemporalDecoder(**_full_config(diffusers_config))
    if len(model.decoder.mid_block.resnets) != 2:
        c = model.config.block_out_channels[-1]
        model.decoder.mid_block = MidBlockTemporalDecoder(
            in_channels=c, out_channels=c, attention_head_dim=c, num_layers=2)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("mix_factor"):
                p.add_(noise)
            elif p.ndim >= 2:
                p.add_(noise * 0.5 * max(float(p.std()), 0.02))
            else:
                p.add_(noise * 0.1)
    return model.eval()


def nnx_vae_from_diffusers(torch_model, diffusers_config: Mapping[str, Any],
                           **config_overrides) -> AutoencoderKL:
    """Our AutoencoderKL holding the torch model's weights (diffusers → sgm → NNX)."""
    sgm_sd = diffusers_vae_state_dict_to_sgm(torch_state_dict_numpy(torch_model), diffusers_config)
    cfg = vae_config_from_diffusers(diffusers_config, **config_overrides)
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    load_torch_state_dict(model, sgm_sd)
    return model


def random_inputs(diffusers_config: Mapping[str, Any], seed: int, num_frames: int = 3,
                  batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """NCHW images [batch*num_frames, in, H, W] and latents [batch*num_frames, z, h, w]; the
    latent grid is non-square (4x5) to catch H/W mix-ups."""
    cfg = {**dict(in_channels=3, latent_channels=4), **dict(diffusers_config)}
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    rng = np.random.default_rng(seed)
    n = batch * num_frames
    images = rng.standard_normal((n, cfg["in_channels"], 4 * f, 5 * f)).astype(np.float32)
    latents = rng.standard_normal((n, cfg["latent_channels"], 4, 5)).astype(np.float32)
    return images, latents


@nnx.jit(static_argnames="num_frames")
def _forward(model: AutoencoderKL, images, latents, num_frames: int):
    # One compiled program: much faster on CPU than op-by-op dispatch of the eager model.
    mean, logvar = model.encode(images)
    return mean, logvar, model.decode(latents, num_frames=num_frames)


def run_nnx(model: AutoencoderKL, images: np.ndarray, latents: np.ndarray,
            num_frames: int) -> list[np.ndarray]:
    """[mean, logvar, decoded] of our model, NCHW like the torch reference."""
    nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))
    outs = _forward(model, nhwc(images), nhwc(latents), num_frames=num_frames)
    return [np.transpose(np.asarray(a, np.float32), (0, 3, 1, 2)) for a in outs]


def run_torch(model, images: np.ndarray, latents: np.ndarray, num_frames: int) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images)).latent_dist
        decoded = model.decode(torch.from_numpy(latents), num_frames=num_frames).sample
    return [t.numpy() for t in (posterior.mean, posterior.logvar, decoded)]


def check_vae_against_diffusers(diffusers_config: dict, seed: int, num_frames: int = 3,
                                **config_overrides) -> float:
    """Random-weight parity (float32, CPU) of the posterior mean, logvar and a `num_frames`-frame
    decode; returns max |ours - ref| / max |ref| over the three. `config_overrides`: VAEConfig
    fields of our model (e.g. `attention`)."""
    ref = make_random_diffusers_vae(diffusers_config, seed)
    ours = nnx_vae_from_diffusers(ref, diffusers_config, **config_overrides)
    images, latents = random_inputs(diffusers_config, seed, num_frames)
    pairs = zip(run_nnx(ours, images, latents, num_frames), run_torch(ref, images, latents, num_frames))
    return max(relative_error(a, b) for a, b in pairs)
