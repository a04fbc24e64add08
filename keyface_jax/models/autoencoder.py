"""SVD autoencoder: the SD kl-f8 image encoder and the SVD temporal `VideoDecoder` (sgm names).

The attribute tree mirrors sgm's state-dict names exactly (`encoder.down.0.block.1.norm1`,
`decoder.up.2.block.0.time_stack.in_layers.0`, `decoder.conv_out.time_mix_conv`, ...), so a generic
importer maps an NNX path to the sgm key by joining it with '.' and renaming `kernel`/`scale` to
`weight` (see `keyface_jax.conversion.nnx_torch`).

Layouts are channels-last: frames [N, H, W, C]; the decoder folds clips into the batch
([B*T, h, w, C]) and unfolds them ([B, T, h, w, C]) around its temporal layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax.models.attention_backends import DEFAULT, AttentionConfig, dot_product_attention
from keyface_jax.models.layers import (Conv, GroupNorm, Identity, SiLU, logical_param, run_sequence)

# The latent scaling of SD/SVD (diffusers `scaling_factor`, sgm `scale_factor`): the one place it lives.
SCALE_FACTOR = 0.18215


def to_diffusion_space(latent: jax.Array) -> jax.Array:
    """VAE latent → the unit-variance space the diffusion model works in."""
    return latent * SCALE_FACTOR


def from_diffusion_space(z: jax.Array) -> jax.Array:
    """Diffusion-space latent → VAE latent (what the decoder expects)."""
    return z / SCALE_FACTOR


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters; the defaults are the SVD autoencoder (sgm ch 128, ch_mult [1, 2, 4, 4]).

    `use_quant_conv`: diffusers' AutoencoderKLTemporalDecoder applies a 1x1 `quant_conv` after the
    encoder (KeyFace's latents were made with it); sgm's AutoencodingEngine has none.
    `use_encoder=False` builds a decoder-only model (KeyFace checkpoints hold no encoder weights).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    use_quant_conv: bool = True
    use_encoder: bool = True
    video_kernel_size: tuple[int, int, int] = (3, 1, 1)
    norm_groups: int = 32
    dtype: Any = None
    param_dtype: Any = jnp.float32
    attention: AttentionConfig = DEFAULT   # backend of the mid-block attention

    @classmethod
    def from_sgm(cls, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 **kwargs) -> "VAEConfig":
        """Builds a config from sgm's (ch, ch_mult, num_res_blocks, z_channels) parameters."""
        return cls(block_out_channels=tuple(ch * m for m in ch_mult), layers_per_block=num_res_blocks,
                   latent_channels=z_channels, **kwargs)


class Namespace(nnx.Module):
    """A parameter-free container, like sgm's bare `nn.Module()` holders (`mid`, `down[i]`, `up[i]`)."""

    def __init__(self, **children):
        for name, child in children.items():
            setattr(self, name, child)


def _fold(x: jax.Array, num_frames: int) -> jax.Array:
    """[B*T, ...] → [B, T, ...]."""
    return x.reshape(x.shape[0] // num_frames, num_frames, *x.shape[1:])


class ResnetBlock(nnx.Module):
    """sgm `ResnetBlock` without timestep embedding: norm-silu-conv twice, 1x1 `nin_shortcut` if
    the channel count changes (GroupNorm eps 1e-6)."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int = 32, rngs: nnx.Rngs,
                 dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(in_channels, num_groups=groups, eps=1e-6, **kw)
        self.conv1 = Conv(in_channels, out_channels, (3, 3), rngs=rngs, **kw)
        self.norm2 = GroupNorm(out_channels, num_groups=groups, eps=1e-6, **kw)
        self.conv2 = Conv(out_channels, out_channels, (3, 3), rngs=rngs, **kw)
        self.nin_shortcut = (Conv(in_channels, out_channels, (1, 1), rngs=rngs, **kw)
                             if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x.astype(h.dtype) + h


class TemporalResBlock(nnx.Module):
    """openaimodel `ResBlock(dims=3, skip_t_emb=True)` as used in `VideoResBlock.time_stack`.

    The Sequential indices are kept (SiLU at 1, dropout at 2) so keys read `in_layers.2`,
    `out_layers.3`. GroupNorm uses PyTorch's default eps 1e-5 and spans the whole clip.
    """

    def __init__(self, channels: int, kernel_size: tuple[int, ...], *, groups: int = 32,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.in_layers = nnx.List([
            GroupNorm(channels, num_groups=groups, eps=1e-5, **kw), SiLU(),
            Conv(channels, channels, kernel_size, rngs=rngs, **kw)])
        self.out_layers = nnx.List([
            GroupNorm(channels, num_groups=groups, eps=1e-5, **kw), SiLU(), Identity(),
            Conv(channels, channels, kernel_size, rngs=rngs, zero_init=True, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, H, W, C]."""
        h = run_sequence(self.out_layers, run_sequence(self.in_layers, x))
        return x.astype(h.dtype) + h


class VideoResBlock(ResnetBlock):
    """sgm `VideoResBlock` (merge_strategy "learned"): a spatial ResnetBlock per frame, then a
    temporal ResBlock over each clip, blended as sigmoid(mix_factor)*temporal + (1-.)*spatial."""

    def __init__(self, in_channels: int, out_channels: int, *, video_kernel_size=(3, 1, 1),
                 groups: int = 32, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        super().__init__(in_channels, out_channels, groups=groups, rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)
        self.time_stack = TemporalResBlock(out_channels, tuple(video_kernel_size), groups=groups,
                                           rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mix_factor = logical_param(None, nnx.initializers.zeros, (1,), param_dtype, (None,))

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        """x: [B*T, H, W, C]; temporal layers see clips of `num_frames` frames."""
        spatial = super().__call__(x)
        temporal = self.time_stack(_fold(spatial, num_frames)).reshape(spatial.shape)
        alpha = jax.nn.sigmoid(self.mix_factor[...].astype(jnp.float32)).astype(spatial.dtype)
        return alpha * temporal + (1.0 - alpha) * spatial


class AttnBlock(nnx.Module):
    """sgm `AttnBlock`: single-head self-attention over the H*W positions of each frame, with
    q/k/v/proj_out as 1x1 convs (as sgm stores them) and a residual connection."""

    def __init__(self, channels: int, *, groups: int = 32, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32, attention: AttentionConfig = DEFAULT):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attention = attention
        self.norm = GroupNorm(channels, num_groups=groups, eps=1e-6, **kw)
        self.q = Conv(channels, channels, (1, 1), rngs=rngs, **kw)
        self.k = Conv(channels, channels, (1, 1), rngs=rngs, **kw)
        self.v = Conv(channels, channels, (1, 1), rngs=rngs, **kw)
        self.proj_out = Conv(channels, channels, (1, 1), rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        y = self.norm(x)
        # One head of width c; the shared attention op (logits and softmax in float32 whatever the
        # compute dtype; long sequences, 64·64 at 512 px, take the memory-efficient backends).
        q, k, v = (m(y).reshape(n, h * w, 1, c) for m in (self.q, self.k, self.v))
        out = dot_product_attention(q, k, v, self.attention, ("act_batch", "act_tokens"))
        out = self.proj_out(out.reshape(n, h, w, c))
        return x.astype(out.dtype) + out


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after zero-padding bottom/right by one (sgm/diffusers asymmetric pad)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = Conv(channels, channels, (3, 3), strides=(2, 2), padding=(0, 0), rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = Conv(channels, channels, (3, 3), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class AE3DConv(Conv):
    """sgm `AE3DConv`: a 3x3 Conv2d (its own `weight`/`bias`) followed by `time_mix_conv`, a
    Conv3d over each clip (no residual)."""

    def __init__(self, in_channels: int, out_channels: int, *, video_kernel_size=(3, 1, 1),
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        super().__init__(in_channels, out_channels, (3, 3), rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)
        self.time_mix_conv = Conv(out_channels, out_channels, tuple(video_kernel_size), rngs=rngs,
                                  dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, num_frames: int) -> jax.Array:
        y = super().__call__(x)
        return self.time_mix_conv(_fold(y, num_frames)).reshape(y.shape)


class Encoder(nnx.Module):
    """SD kl-f8 `Encoder` (no attention in the down path, double_z). Returns the moments
    [N, h, w, 2*latent] = [mean | logvar] along the channel axis."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        g, chans = cfg.norm_groups, cfg.block_out_channels
        self.conv_in = Conv(cfg.in_channels, chans[0], (3, 3), rngs=rngs, **kw)
        levels, block_in = [], chans[0]
        for i, block_out in enumerate(chans):
            blocks = []
            for _ in range(cfg.layers_per_block):
                blocks.append(ResnetBlock(block_in, block_out, groups=g, rngs=rngs, **kw))
                block_in = block_out
            down = Downsample(block_in, rngs=rngs, **kw) if i < len(chans) - 1 else None
            levels.append(Namespace(block=nnx.List(blocks), downsample=down))
        self.down = nnx.List(levels)
        self.mid = Namespace(
            block_1=ResnetBlock(block_in, block_in, groups=g, rngs=rngs, **kw),
            attn_1=AttnBlock(block_in, groups=g, rngs=rngs, attention=cfg.attention, **kw),
            block_2=ResnetBlock(block_in, block_in, groups=g, rngs=rngs, **kw))
        self.norm_out = GroupNorm(block_in, num_groups=g, eps=1e-6, **kw)
        self.conv_out = Conv(block_in, 2 * cfg.latent_channels, (3, 3), rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class VideoDecoder(nnx.Module):
    """SVD temporal decoder (sgm `VideoDecoder`, time_mode "conv-only"): VideoResBlocks, a spatial
    mid attention, and `AE3DConv` output. `up[i]` is resolution level i (0 = full resolution);
    levels run from the last to the first, as in sgm."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        vk, g, chans = tuple(cfg.video_kernel_size), cfg.norm_groups, cfg.block_out_channels
        block_in = chans[-1]
        self.conv_in = Conv(cfg.latent_channels, block_in, (3, 3), rngs=rngs, **kw)
        video_block = lambda cin, cout: VideoResBlock(cin, cout, video_kernel_size=vk, groups=g,
                                                      rngs=rngs, **kw)
        self.mid = Namespace(block_1=video_block(block_in, block_in),
                             attn_1=AttnBlock(block_in, groups=g, rngs=rngs, attention=cfg.attention,
                                              **kw),
                             block_2=video_block(block_in, block_in))
        levels = [None] * len(chans)
        for i in reversed(range(len(chans))):
            blocks = []
            for _ in range(cfg.layers_per_block + 1):
                blocks.append(video_block(block_in, chans[i]))
                block_in = chans[i]
            up = Upsample(block_in, rngs=rngs, **kw) if i > 0 else None
            levels[i] = Namespace(block=nnx.List(blocks), upsample=up)
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(block_in, num_groups=g, eps=1e-6, **kw)
        self.conv_out = AE3DConv(block_in, cfg.out_channels, video_kernel_size=vk, rngs=rngs, **kw)

    def __call__(self, z: jax.Array, num_frames: int | None = None) -> jax.Array:
        """z: [B*T, h, w, c] with `num_frames` = T, or [B, T, h, w, c]; output has z's layout."""
        if z.ndim == 5:
            num_frames = z.shape[1] if num_frames is None else num_frames
            if num_frames != z.shape[1]:
                raise ValueError(f"num_frames={num_frames} but latents have {z.shape[1]} frames")
            return _fold(self(z.reshape(-1, *z.shape[2:]), num_frames), num_frames)
        if num_frames is None:
            raise ValueError("num_frames is required for [B*T, h, w, c] latents")
        if z.shape[0] % num_frames:
            raise ValueError(f"batch {z.shape[0]} is not a multiple of num_frames={num_frames}")
        h = self.conv_in(z)
        h = self.mid.block_1(h, num_frames)
        h = self.mid.block_2(self.mid.attn_1(h), num_frames)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h, num_frames)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)), num_frames)


def posterior_mode(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Mode (= mean) of the diagonal Gaussian posterior."""
    del logvar
    return mean


def posterior_sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """mean + exp(logvar / 2) * eps, eps ~ N(0, I) (logvar already clipped by `encode`)."""
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps


class AutoencoderKL(nnx.Module):
    """Encoder (+ optional quant_conv) and SVD VideoDecoder; outputs are float32."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        if cfg.use_encoder:
            self.encoder = Encoder(cfg, rngs=rngs)
            if cfg.use_quant_conv:
                z2 = 2 * cfg.latent_channels
                self.quant_conv = Conv(z2, z2, (1, 1), rngs=rngs, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype)
        self.decoder = VideoDecoder(cfg, rngs=rngs)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [..., H, W, C] in [-1, 1] → posterior (mean, logvar), each [..., h, w, latent].
        logvar is clipped to [-30, 20] as in sgm/diffusers."""
        if not self.config.use_encoder:
            raise ValueError("this AutoencoderKL was built with use_encoder=False")
        lead = x.shape[:-3]
        moments = self.encoder(x.reshape(-1, *x.shape[-3:]))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32).reshape(*lead, *moments.shape[1:])
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode_to_diffusion(self, x: jax.Array, key: jax.Array | None = None,
                            mode: bool = False) -> jax.Array:
        """Images → scaled latents for the diffusion model: a posterior sample (KeyFace's latent
        precomputation samples) or, with mode=True, the mean."""
        if key is None and not mode:
            raise ValueError("encode_to_diffusion needs a PRNG key unless mode=True")
        mean, logvar = self.encode(x)
        latent = posterior_mode(mean, logvar) if mode else posterior_sample(mean, logvar, key)
        return to_diffusion_space(latent)

    def decode(self, latent: jax.Array, num_frames: int | None = None) -> jax.Array:
        """VAE latents [B*T, h, w, c] (with num_frames) or [B, T, h, w, c] → images, same layout."""
        return self.decoder(latent, num_frames).astype(jnp.float32)

    def decode_from_diffusion(self, z: jax.Array, num_frames: int | None = None) -> jax.Array:
        """Diffusion-space latents → images (undoes the scaling first)."""
        return self.decode(from_diffusion_space(z), num_frames)
