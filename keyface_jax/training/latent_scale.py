"""Give a freshly trained autoencoder SVD's latent scale, without changing what it reconstructs.

The diffusion side of KeyFace fixes the latent scaling at SVD's 0.18215 (`models.autoencoder`),
chosen so that SVD's latents × 0.18215 have unit variance, the scale the EDM noise schedule (σ_data
= 1 in the v-objective) assumes. An autoencoder trained from scratch settles at its own scale (the
tiny demo one at std ≈ 3 instead of 1 / 0.18215 ≈ 5.5); its diffusion-space latents then have
std ≈ 0.55 and the denoiser is trained and sampled at the wrong signal-to-noise ratios.

`rescale_latents` folds a factor s into the weights: the encoder's 1×1 `quant_conv` produces
s × mean and logvar + 2 log s (so every posterior sample is s × the old one), and the decoder's
first convolution, linear in its input, takes the 1/s. Reconstructions are unchanged up to float
rounding; the latents are s times larger. Exported autoencoders get s = (1 / 0.18215) / std of the
posterior means over the evaluation frames.
"""

from __future__ import annotations

import math

import numpy as np

from keyface_jax.models.autoencoder import SCALE_FACTOR

TARGET_LATENT_STD = 1.0 / SCALE_FACTOR


def factor_for(latent_std: float) -> float:
    """The s that brings latents of standard deviation `latent_std` to SVD's scale."""
    if not math.isfinite(latent_std) or latent_std <= 0:
        raise ValueError(f"cannot rescale latents of standard deviation {latent_std}")
    return TARGET_LATENT_STD / latent_std


def rescale_latents(tree: dict, factor: float) -> dict:
    """A copy of an autoencoder parameter tree (pure dict, as exported) whose latents are
    `factor` × the original's. Needs the encoder's quant_conv (SVD's layout has one)."""
    if "quant_conv" not in tree:
        raise ValueError("rescale_latents needs the encoder's quant_conv (use_quant_conv=True)")
    out = {key: value for key, value in tree.items()}
    quant = {k: np.array(v, copy=True) for k, v in tree["quant_conv"].items()}
    latent = quant["kernel"].shape[-1] // 2                     # outputs: [mean | logvar]
    quant["kernel"][..., :latent] *= factor
    quant["bias"][:latent] *= factor
    quant["bias"][latent:] += 2.0 * math.log(factor)
    out["quant_conv"] = quant
    decoder = dict(tree["decoder"])
    conv_in = {k: np.array(v, copy=True) for k, v in decoder["conv_in"].items()}
    conv_in["kernel"] /= factor                                 # HWIO: scales every input channel
    decoder["conv_in"] = conv_in
    out["decoder"] = decoder
    return out
