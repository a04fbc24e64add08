"""Jitted sampling entry points: keyframes, interpolation and training previews (spec §1.3, §5).

Each call is one `jax.jit` holding the noise draw and the whole Euler loop, so Python only sees
final latents. Static under jit: the graphdef, the array shapes and the number of steps; traced:
parameters, conditions, keys, σ values and guidance scales (new scales do not recompile).

Networks come as (graphdef, state) from `nnx.split`. Conditions follow the networks' keyword
arguments (diffusion-space latents are the caller's business: identity/first/last are *raw* VAE
latents, as the networks expect). Shard clips over devices by passing inputs with a batch-axis
`NamedSharding`; jit propagates it and guidance folding keeps each device's work local.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax.diffusion.scalings import denoise
from keyface_jax.models.autoencoder import to_diffusion_space
from keyface_jax.sampling import guidance, guided
from keyface_jax.sampling.euler import initial_noise, sample
from keyface_jax.sampling.schedules import AYS_MIN_STEPS, ays_sigmas


def latent_shape(conditions: Mapping[str, jax.Array]) -> tuple[int, int, int, int]:
    """(T, h, w, C) of one clip's latents: T from audio [B,T,...], the rest from the condition
    latent (identity or first) [B,h,w,C]."""
    latent = conditions["identity"] if "identity" in conditions else conditions["first"]
    return (conditions["audio"].shape[1],) + tuple(latent.shape[1:])


def share_audio_projection(bad_state: nnx.State, good_state: nnx.State) -> nnx.State:
    """The bad network with the good one's audio projection: the reference loads only the bad
    checkpoint's UNet and learned_mask and runs it through the main model's conditioner."""
    return nnx.merge_state(bad_state, nnx.State({"audio_proj": good_state["audio_proj"]}))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _keyframes(graphdef, state, conditions, keys, sigmas, audio_scale, ref_scale, bad_state=None,
               autoguidance_scale=None):
    net = nnx.merge(graphdef, state)
    if bad_state is None:
        denoise_fn = guided.keyframe_cfg_denoiser(net, conditions, audio_scale, ref_scale)
    else:
        denoise_fn = guided.keyframe_cfg_autoguidance_denoiser(
            net, nnx.merge(graphdef, bad_state), conditions, audio_scale, ref_scale,
            autoguidance_scale)
    return sample(denoise_fn, initial_noise(keys, latent_shape(conditions)), sigmas)


def sample_keyframes(graphdef: nnx.GraphDef, state: nnx.State, conditions: Mapping[str, jax.Array],
                     keys: jax.Array, *, num_steps: int = AYS_MIN_STEPS,
                     audio_scale: float = guidance.KEYFRAME_AUDIO_SCALE,
                     ref_scale: float = guidance.KEYFRAME_REF_SCALE,
                     bad_state: nnx.State | None = None,
                     autoguidance_scale: float = guidance.AUTOGUIDANCE_SCALE,
                     share_audio_proj: bool = True) -> jax.Array:
    """Keyframe clips with the 3-branch audio/reference guider, optionally plus autoguidance by a
    weaker keyframe network (`guidance.audio_ref_autoguidance`).

    Args:
      graphdef, state: a KeyframeNet split with `nnx.split`.
      conditions: identity [B,h,w,C] raw latent, audio [B,T,tokens,D], valence/arousal [B,T].
      keys: [B] PRNG keys, one per clip (a clip's result depends on its key only).
      num_steps: AYS schedule size (10 → 11 network evaluations).
      audio_scale, ref_scale: guidance scales (traced: changing them does not recompile).
      bad_state: the weaker keyframe network's parameters (same graphdef), or None (3 branches
        only).
      autoguidance_scale: w of the autoguidance term (traced; used only with bad_state).
      share_audio_proj: run the bad network with the good one's audio projection, as the
        interpolation sampler does.
    Returns:
      [B, T, h, w, C] float32 diffusion-space latents.
    """
    if bad_state is not None and share_audio_proj:
        bad_state = share_audio_projection(bad_state, state)
    return _keyframes(graphdef, state, dict(conditions), keys, ays_sigmas(num_steps),
                      jnp.float32(audio_scale), jnp.float32(ref_scale), bad_state,
                      None if bad_state is None else jnp.float32(autoguidance_scale))


def pin_endpoints(denoise_fn, first_z: jax.Array, last_z: jax.Array):
    """D(x; σ) with frames 0 and −1 replaced by the known keyframes (diffusion space) at every
    step, so the trajectory ends exactly on them and adjacent segments agree on their shared
    boundary frame throughout. This is what the reference's per-step multi-diffusion averaging of
    overlapping boundaries was for (its loop never ran, spec §9.2); pinning needs no traffic
    between segments, so segments can be packed into any batch."""
    def pinned(x, sigma):
        d = denoise_fn(x, sigma)
        return d.at[:, 0].set(first_z.astype(d.dtype)).at[:, -1].set(last_z.astype(d.dtype))
    return pinned


@functools.partial(jax.jit, static_argnames=("graphdef", "pin", "audio_cfg"))
def _interpolation(graphdef, good_state, bad_state, conditions, keys, sigmas, scale, pin=False,
                   audio_cfg=False):
    good = nnx.merge(graphdef, good_state)
    if audio_cfg:  # classifier-free guidance on the audio: D_noaudio + w·(D − D_noaudio)
        frames = latent_shape(conditions)[0]
        denoise_fn = guided.linear_cfg_denoiser(good, conditions, dict(audio_keep=0.0),
                                                jnp.full((frames,), scale, jnp.float32))
    elif bad_state is None:  # no weaker network: the plain conditional denoiser
        denoise_fn = lambda x, sigma: denoise(good, x, sigma, **conditions)
    else:
        denoise_fn = guided.autoguidance_denoiser(good, nnx.merge(graphdef, bad_state), conditions,
                                                  scale)
    if pin:
        denoise_fn = pin_endpoints(denoise_fn, to_diffusion_space(conditions["first"]),
                                   to_diffusion_space(conditions["last"]))
    return sample(denoise_fn, initial_noise(keys, latent_shape(conditions)), sigmas)


def sample_interpolation(graphdef: nnx.GraphDef, good_state: nnx.State, bad_state: nnx.State | None,
                         conditions: Mapping[str, jax.Array], keys: jax.Array, *,
                         num_steps: int = AYS_MIN_STEPS, scale: float = guidance.AUTOGUIDANCE_SCALE,
                         share_audio_proj: bool = True, pin_boundaries: bool = False,
                         audio_cfg: bool = False) -> jax.Array:
    """In-between frames with autoguidance by a weaker interpolation network (or, with
    `audio_cfg`, classifier-free guidance on the audio instead).

    The two networks run as two calls per step, not one vmap over stacked parameters: on CPU the
    vmapped form (grouped convolutions) measured 2.2× slower for `tiny` and 1.9× for `small`, and
    it would hold a stacked copy of both parameter sets (`guided.stacked_autoguidance_denoiser`).

    Args:
      graphdef: the InterpolationNet graphdef, shared by both networks.
      good_state, bad_state: the main and the weaker ("bad") network's parameters; bad_state None
        samples with the main network's conditional prediction alone (one call per step).
      conditions: first/last [B,h,w,C] raw latents, audio [B,T,tokens,D].
      keys: [B] PRNG keys, one per segment.
      scale: autoguidance weight w in D_bad + w·(D_good − D_bad) (traced).
      share_audio_proj: run the bad network with the good one's audio projection, as the reference.
      pin_boundaries: hold frames 0 and −1 on the condition latents at every step (`pin_endpoints`).
      audio_cfg: guide with the main network without audio instead of a weaker network,
        D_noaudio + scale·(D − D_noaudio) (one folded call per step; bad_state must be None).
    Returns:
      [B, T, h, w, C] float32 diffusion-space latents (endpoints included).
    """
    if audio_cfg and bad_state is not None:
        raise ValueError("audio_cfg guides with the main network: pass bad_state=None")
    if share_audio_proj and bad_state is not None:
        bad_state = share_audio_projection(bad_state, good_state)
    return _interpolation(graphdef, good_state, bad_state, dict(conditions), keys,
                          ays_sigmas(num_steps), jnp.float32(scale), pin=bool(pin_boundaries),
                          audio_cfg=bool(audio_cfg))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _preview(graphdef, state, conditions, keys, sigmas, frame_scales):
    uncond = guided.KEYFRAME_UNCOND if "identity" in conditions else guided.INTERPOLATION_UNCOND
    denoise_fn = guided.linear_cfg_denoiser(nnx.merge(graphdef, state), conditions, uncond,
                                            frame_scales)
    return sample(denoise_fn, initial_noise(keys, latent_shape(conditions)), sigmas)


def sample_preview(graphdef: nnx.GraphDef, state: nnx.State, conditions: Mapping[str, jax.Array],
                   keys: jax.Array, *, num_steps: int = AYS_MIN_STEPS,
                   min_scale: float = guidance.PREVIEW_MIN_SCALE,
                   max_scale: float = guidance.PREVIEW_MAX_SCALE) -> jax.Array:
    """Training-preview samples for either network with the linear-prediction guider: CFG with
    condition latents and audio dropped, scale ramping over frames from min_scale to max_scale."""
    frame_scales = guidance.linear_frame_scales(latent_shape(conditions)[0], min_scale, max_scale)
    return _preview(graphdef, state, dict(conditions), keys, ays_sigmas(num_steps), frame_scales)
