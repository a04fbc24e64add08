"""Decoding diffusion-space latents to frames through the temporal VAE decoder, used by the
generation pipeline and by its jax.export (one definition for both)."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from keyface_jax.models.autoencoder import from_diffusion_space


def decode_segments(autoencoder, z: jax.Array, decode_frames: int) -> jax.Array:
    """Diffusion-space latents [B, T, h, w, c] → images [B, T, H, W, 3], the temporal decoder
    seeing `decode_frames` consecutive frames at a time."""
    b, t = z.shape[:2]
    if t % decode_frames:
        raise ValueError(f"decode_frames={decode_frames} does not divide the {t}-frame segment")
    groups = z.reshape(b * t // decode_frames, decode_frames, *z.shape[2:])
    images = autoencoder.decode(from_diffusion_space(groups))
    return images.reshape(b, t, *images.shape[2:])


@functools.partial(jax.jit, static_argnames=("graphdef", "decode_frames"))
def decode_jitted(graphdef, state, z, decode_frames):
    return decode_segments(nnx.merge(graphdef, state), z, decode_frames)
