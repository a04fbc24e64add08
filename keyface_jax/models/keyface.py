"""The two KeyFace networks on top of the VideoUNet (spec §1.2, §2.2-2.4).

Both take the preconditioned noisy latent `x` [B, T, h, w, 4] (already × c_in) and c_noise [B], and
build the UNet's channel concat, cross-attention context and label vector y from their conditions.
Condition latents are *raw* VAE latents (diffusion-space latents ÷ 0.18215), as in the reference.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from keyface_jax.models.layers import Linear, logical_param, timestep_embedding
from keyface_jax.models.unet import UNetConfig, VideoUNet

EMOTION_EMBED_DIM = 256  # sinusoidal width of each of valence and arousal


@dataclasses.dataclass(frozen=True)
class KeyFaceConfig:
    """A KeyFace network: its UNet plus the audio projection (and the interpolation mask token)."""

    kind: str                      # "keyframe" | "interpolation"
    unet: UNetConfig
    audio_dim: int = 1536          # speech (768) ⊕ audio-event (768) features per token
    audio_tokens_per_frame: int = 2
    latent_channels: int = 4
    latent_size: int = 64          # h = w of the latent (512 px / 8)

    def __post_init__(self):
        if self.kind not in ("keyframe", "interpolation"):
            raise ValueError(f"KeyFaceConfig.kind must be 'keyframe' or 'interpolation', got {self.kind!r}")
        ctx = self.unet.context_dim
        expect_in = 2 * self.latent_channels + (self.kind == "interpolation")
        expect_adm = ctx + (2 * EMOTION_EMBED_DIM if self.kind == "keyframe" else 0)
        if self.unet.in_channels != expect_in:
            raise ValueError(f"{self.kind} network needs unet.in_channels={expect_in}, "
                             f"got {self.unet.in_channels}")
        if self.unet.adm_in_channels != expect_adm:
            raise ValueError(f"{self.kind} network needs unet.adm_in_channels={expect_adm} "
                             f"(= context_dim{' + 512 emotion' if self.kind == 'keyframe' else ''}), "
                             f"got {self.unet.adm_in_channels}")


def _keep(mask, x):
    """Zeroes the samples of x [B, ...] whose mask [B] is 0 (classifier-free-guidance dropout)."""
    if mask is None:
        return x
    return x * mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


class KeyFaceNet(nnx.Module):
    """Common part: the UNet (`diffusion_model`) and the trainable audio projection."""

    def __init__(self, config: KeyFaceConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.config = config
        self.diffusion_model = VideoUNet(config.unet, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.audio_proj = Linear(config.audio_dim, config.unet.context_dim, rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype)

    def audio_context(self, audio, audio_keep=None):
        """audio [B, T, tokens, audio_dim] → context [B, T, context_dim]: mean of each frame's tokens,
        projected; a dropped sample's projection *output* is zeroed, as the reference does."""
        return _keep(audio_keep, self.audio_proj(audio.mean(axis=2)))


class KeyframeNet(KeyFaceNet):
    """8 input channels (noisy ⊕ identity latent broadcast over frames); y = [valence 256 |
    arousal 256 | audio context 1024] per frame; the audio context is also the cross-attention
    context (`both_keyframes` routing, spec §2.3)."""

    def __call__(self, x, c_noise, *, identity, audio, valence, arousal, audio_keep=None,
                 identity_keep=None):
        """x [B,T,h,w,4], c_noise [B], identity [B,h,w,4] raw latent, audio [B,T,2,1536],
        valence/arousal [B,T]; *_keep [B] in {0,1} (None = keep all) → [B,T,h,w,4]."""
        b, t = x.shape[:2]
        ident = _keep(identity_keep, identity).astype(x.dtype)
        x = jnp.concatenate([x, jnp.broadcast_to(ident[:, None], x.shape[:2] + ident.shape[1:])], -1)
        context = self.audio_context(audio, audio_keep)
        y = jnp.concatenate([timestep_embedding(valence, EMOTION_EMBED_DIM),
                             timestep_embedding(arousal, EMOTION_EMBED_DIM),
                             context.astype(jnp.float32)], axis=-1)
        return self.diffusion_model(x, c_noise, context, y)


class InterpolationNet(KeyFaceNet):
    """9 input channels: noisy latent, the condition sequence [first | learned mask token × (T−2) |
    last], and a binary mask channel (1 at the two ends); y = the audio context per frame."""

    def __init__(self, config: KeyFaceConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        super().__init__(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        s, c = config.latent_size, config.latent_channels
        self.learned_mask = logical_param(None, nnx.initializers.zeros, (s, s, c), param_dtype,
                                          (None, None, None))

    def __call__(self, x, c_noise, *, first, last, audio, audio_keep=None, cond_keep=None):
        """x [B,T,h,w,4], c_noise [B], first/last [B,h,w,4] raw latents, audio [B,T,2,1536]."""
        b, t, h, w, c = x.shape
        if self.learned_mask.shape != (h, w, c):
            raise ValueError(f"InterpolationNet: latent {h}x{w}x{c} does not match the learned mask "
                             f"{self.learned_mask.shape} (config.latent_size)")
        first = _keep(cond_keep, first).astype(x.dtype)
        last = _keep(cond_keep, last).astype(x.dtype)
        middle = jnp.broadcast_to(self.learned_mask[...].astype(x.dtype), (b, t - 2, h, w, c))
        cond = jnp.concatenate([first[:, None], middle, last[:, None]], axis=1)
        ends = jnp.zeros((t,), x.dtype).at[0].set(1).at[-1].set(1)
        mask = jnp.broadcast_to(ends[None, :, None, None, None], (b, t, h, w, 1))
        context = self.audio_context(audio, audio_keep)
        return self.diffusion_model(jnp.concatenate([x, cond, mask], -1), c_noise, context, context)


def build_network(config: KeyFaceConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    cls = KeyframeNet if config.kind == "keyframe" else InterpolationNet
    return cls(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
