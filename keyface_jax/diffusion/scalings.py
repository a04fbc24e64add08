"""EDM preconditioning with v-prediction and σ_data = 1 (spec §4; sgm `VScalingWithEDMcNoise`).

D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise), with
  c_skip = 1/(σ²+1),  c_out = −σ/√(σ²+1),  c_in = 1/√(σ²+1),  c_noise = ¼·ln σ.
Shared by the training loss and the sampler, so both see the same network parametrisation.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

SIGMA_DATA = 1.0  # SVD's latent scale; the formulas below hard-code it.


def vscaling(sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """σ [...] → (c_skip, c_out, c_in, c_noise), each shaped like σ (computed in float32)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    var = sigma**2 + SIGMA_DATA**2
    c_skip = SIGMA_DATA**2 / var
    c_out = -sigma * SIGMA_DATA * jax.lax.rsqrt(var)
    c_in = jax.lax.rsqrt(var)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise


def _per_sample(v: jax.Array, ndim: int) -> jax.Array:
    """[B] → [B, 1, ..., 1] so it broadcasts over one sample's [T, h, w, C]."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def denoise(network_fn: Callable, x_noisy: jax.Array, sigma: jax.Array, **cond) -> jax.Array:
    """The preconditioned denoiser D(x; σ): the x0 prediction.

    Args:
      network_fn: F(x_in [B,T,h,w,C], c_noise [B], **cond) → [B,T,h,w,C] (e.g. a KeyframeNet).
      x_noisy: [B, T, h, w, C] noisy latents x0 + σ·ε (diffusion-space scale).
      sigma: [B] noise level per sample (a scalar is broadcast to the batch).
      **cond: passed through to network_fn.
    Returns:
      [B, T, h, w, C] in x_noisy's dtype.
    """
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x_noisy.shape[:1])
    c_skip, c_out, c_in, c_noise = vscaling(sigma)
    c_skip, c_out, c_in = (_per_sample(c, x_noisy.ndim) for c in (c_skip, c_out, c_in))
    x32 = x_noisy.astype(jnp.float32)
    f = network_fn((c_in * x32).astype(x_noisy.dtype), c_noise, **cond)
    return (c_skip * x32 + c_out * f.astype(jnp.float32)).astype(x_noisy.dtype)
