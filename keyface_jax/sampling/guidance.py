"""Guidance rules: how the branch predictions of one step combine (spec §5). Pure array maths.

All inputs are x0 predictions D(x; σ) of shape [B, T, h, w, C] (the reference guides denoised
latents, not ε or v). Scales may be Python floats or traced scalars.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Release defaults (scripts/sampling/configs/{keyframe,interpolation}.yaml).
KEYFRAME_AUDIO_SCALE = 5.0
KEYFRAME_REF_SCALE = 2.0
AUTOGUIDANCE_SCALE = 2.0
# Training-preview guider (LinearPredictionGuider): per-frame scale from 1.0 to 2.5.
PREVIEW_MIN_SCALE = 1.0
PREVIEW_MAX_SCALE = 2.5


def audio_ref_cfg(d_uncond, d_ref, d_full, audio_scale=KEYFRAME_AUDIO_SCALE,
                  ref_scale=KEYFRAME_REF_SCALE):
    """Keyframe 3-branch guidance (`AudioRefMultiCondGuider`, use_normalized=False):
    uncond (no audio, no identity) + ref·(identity only − uncond) + audio·(full − identity only)."""
    return d_uncond + ref_scale * (d_ref - d_uncond) + audio_scale * (d_full - d_ref)


def audio_ref_autoguidance(d_uncond, d_ref, d_full, d_bad_full, audio_scale=KEYFRAME_AUDIO_SCALE,
                           ref_scale=KEYFRAME_REF_SCALE, autoguidance_scale=AUTOGUIDANCE_SCALE):
    """Keyframe 3-branch guidance plus autoguidance of the full branch by a weaker network:
    audio_ref_cfg(...) + (w − 1)·(D_full − D_bad,full). w = 1 is `audio_ref_cfg`; with the other
    scales at 1 it is `autoguidance(d_bad_full, d_full, w)`."""
    return (audio_ref_cfg(d_uncond, d_ref, d_full, audio_scale, ref_scale)
            + (autoguidance_scale - 1.0) * (d_full - d_bad_full))


def autoguidance(d_bad, d_good, scale=AUTOGUIDANCE_SCALE):
    """Autoguidance (Karras et al. 2024; `KarrasGuider`): D_bad + w·(D_good − D_bad), both networks
    given the same conditional inputs."""
    return d_bad + scale * (d_good - d_bad)


def linear_frame_scales(num_frames: int, min_scale=PREVIEW_MIN_SCALE,
                        max_scale=PREVIEW_MAX_SCALE) -> jax.Array:
    """[T] CFG scales ramping linearly from min_scale (frame 0) to max_scale (last frame)."""
    return jnp.linspace(min_scale, max_scale, num_frames, dtype=jnp.float32)


def linear_prediction_cfg(d_uncond, d_cond, frame_scales):
    """Per-frame CFG (`LinearPredictionGuider`): d_u + s_t·(d_c − d_u), with frame_scales [T]
    applied along the frame axis (axis 1)."""
    s = jnp.asarray(frame_scales, jnp.float32).reshape((1, -1) + (1,) * (d_cond.ndim - 2))
    return d_uncond + s * (d_cond - d_uncond)
