"""The autoencoder objective: pixel reconstruction (+ optional LPIPS) and a small KL to N(0, I).

Terms are means per element (pixel channel / latent channel), so weights do not change with the
frame size. For scale: SD's kl-f8 recipe (sums, KL weight 1e-6) is a KL weight of about 2e-8 in
these units; the default 1e-6 regularises a little more, still far below the reconstruction.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from keyface_jax.models.autoencoder import posterior_sample

RECONSTRUCTIONS = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class AutoencoderLossConfig:
    reconstruction: str = "l1"
    reconstruction_weight: float = 1.0
    kl_weight: float = 1e-6
    lpips_weight: float = 0.0
    # L1 between the horizontal and vertical pixel differences of reconstruction and target:
    # penalises lost edges, which a per-pixel L1 lets an autoencoder trade for a blur (a stand-in
    # for LPIPS where its weights are not available)
    gradient_weight: float = 0.0

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"config.loss.reconstruction: {self.reconstruction!r}; choose one of "
                             f"{RECONSTRUCTIONS}")

    @classmethod
    def from_config(cls, loss_cfg) -> "AutoencoderLossConfig":
        return cls(reconstruction=loss_cfg.reconstruction,
                   reconstruction_weight=float(loss_cfg.reconstruction_weight),
                   kl_weight=float(loss_cfg.kl_weight), lpips_weight=float(loss_cfg.lpips_weight),
                   gradient_weight=float(loss_cfg.get("gradient_weight", 0.0)))


def to_unit_range(frames_uint8: jax.Array) -> jax.Array:
    """uint8 pixels → float32 in [-1, 1] (what the VAE encodes)."""
    return frames_uint8.astype(jnp.float32) / 127.5 - 1.0


def psnr(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch; the
    reconstruction is clipped to the valid range first, as a saved video would be."""
    mse = jnp.mean(jnp.square(jnp.clip(reconstruction, -1.0, 1.0) - target))
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))


def gradient_l1(reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean L1 distance of the horizontal and vertical neighbour differences of images
    [..., H, W, C] (edges and fine texture)."""
    dx = lambda a: a[..., :, 1:, :] - a[..., :, :-1, :]
    dy = lambda a: a[..., 1:, :, :] - a[..., :-1, :, :]
    return 0.5 * (jnp.mean(jnp.abs(dx(reconstruction) - dx(target)))
                  + jnp.mean(jnp.abs(dy(reconstruction) - dy(target))))


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Mean over latent elements of KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def autoencoder_loss(model, frames: jax.Array, key: jax.Array, config: AutoencoderLossConfig, *,
                     lpips=None) -> tuple[jax.Array, dict]:
    """(loss, metrics) of one batch of uint8 clips [B, T, H, W, 3]: encode every frame, decode a
    posterior sample with the temporal decoder seeing the T frames of each clip.

    metrics: loss, recon, kl, psnr, latent_std (of the posterior means: the diffusion model sees
    latents × 0.18215, so ~5.5 here would make them unit-variance as with SVD's VAE), and lpips
    when enabled."""
    if frames.ndim != 5:
        raise ValueError(f"frames must be [B, T, H, W, 3], got {frames.shape}")
    if config.lpips_weight > 0 and lpips is None:
        raise ValueError("config.loss.lpips_weight > 0 needs the LPIPS network (its weight files)")
    x = to_unit_range(frames)
    mean, logvar = model.encode(x)
    latent = posterior_sample(mean, logvar, key)
    decoded = model.decode(latent)  # [B, T, h, w, c] keeps the clip axis for the temporal layers
    if config.reconstruction == "l1":
        recon = jnp.mean(jnp.abs(decoded - x))
    else:
        recon = jnp.mean(jnp.square(decoded - x))
    kl = kl_to_standard_normal(mean, logvar)
    loss = config.reconstruction_weight * recon + config.kl_weight * kl
    metrics = dict(recon=recon, kl=kl, psnr=psnr(decoded, x),
                   latent_std=jnp.std(jax.lax.stop_gradient(mean)))
    if config.gradient_weight > 0:
        edges = gradient_l1(decoded, x)
        loss = loss + config.gradient_weight * edges
        metrics["gradient"] = edges
    if config.lpips_weight > 0:
        flat = lambda a: a.reshape(-1, *a.shape[-3:])
        perceptual = jnp.mean(lpips(flat(decoded), flat(x)))
        loss = loss + config.lpips_weight * perceptual
        metrics["lpips"] = perceptual
    metrics["loss"] = loss
    return loss, metrics
