"""Sampling: AYS σ schedule, deterministic Euler loop, guidance, jitted keyframe/interpolation runs.

Layers, each usable on its own: `schedules` (σ lists), `euler` (the generic loop over any
denoise_fn), `guidance` (how branch predictions combine), `guided` (denoise_fns that fold guidance
branches into one network call), `sampler` (one jitted call per stage over (graphdef, state)).
"""

from keyface_jax.sampling.euler import euler_step, initial_noise, sample
from keyface_jax.sampling.sampler import sample_interpolation, sample_keyframes, sample_preview
from keyface_jax.sampling.schedules import AYS_SIGMAS, ays_sigmas

__all__ = ["AYS_SIGMAS", "ays_sigmas", "euler_step", "initial_noise", "sample",
           "sample_interpolation", "sample_keyframes", "sample_preview"]
