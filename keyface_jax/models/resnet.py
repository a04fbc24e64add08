"""Residual blocks of the SVD UNet: ResBlock (2-D or (3,1,1) temporal), VideoResBlock, resampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax.models.layers import Conv, GroupNorm, Identity, Linear, SiLU, logical_param


class ResBlock(nnx.Module):
    """sgm/openaimodel ResBlock without scale-shift: in_layers, emb_layers, out_layers, skip.

    2-D (`kernel_size=(3, 3)`) on x [N, H, W, C] with emb [N, E]; temporal (`kernel_size=(3, 1, 1)`)
    on x [B, T, H, W, C] with a per-frame emb [B, T, E] (the reference's `exchange_temb_dims`).
    """

    def __init__(self, channels: int, emb_channels: int | None, out_channels: int, *,
                 kernel_size=(3, 3), eps: float = 1e-5, rngs: nnx.Rngs, dtype=None,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_layers = nnx.List([GroupNorm(channels, eps=eps, **kw), SiLU(),
                                   Conv(channels, out_channels, kernel_size, **kw)])
        self.emb_layers = (nnx.List([SiLU(), Linear(emb_channels, out_channels, **kw)])
                           if emb_channels else None)
        self.out_layers = nnx.List([GroupNorm(out_channels, eps=eps, **kw), SiLU(), Identity(),
                                    Conv(out_channels, out_channels, kernel_size, zero_init=True, **kw)])
        self.skip_connection = (Conv(channels, out_channels, (1,) * len(kernel_size), **kw)
                                if out_channels != channels else None)

    def __call__(self, x, emb=None):
        h = x
        for layer in self.in_layers:
            h = layer(h)
        if self.emb_layers is not None:
            e = self.emb_layers[1](self.emb_layers[0](emb)).astype(h.dtype)
            h = h + e.reshape(e.shape[:-1] + (1,) * (h.ndim - e.ndim) + e.shape[-1:])
        for layer in self.out_layers:
            h = layer(h)
        skip = x if self.skip_connection is None else self.skip_connection(x)
        return skip + h


class AlphaBlender(nnx.Module):
    """Learned merge out = α·spatial + (1−α)·temporal, α = sigmoid(mix_factor) ("learned_with_images"
    for video input: the image-only branch of the reference never applies to clips)."""

    def __init__(self, alpha: float = 0.5, *, param_dtype=jnp.float32):
        self.mix_factor = logical_param(None, nnx.initializers.constant(alpha), (1,), param_dtype, (None,))

    def __call__(self, x_spatial, x_temporal):
        alpha = jax.nn.sigmoid(self.mix_factor[...].astype(jnp.float32)).astype(x_spatial.dtype)
        return alpha * x_spatial + (1.0 - alpha) * x_temporal


class VideoResBlock(nnx.Module):
    """Spatial ResBlock per frame, then a (3,1,1) temporal ResBlock over the clip, α-merged.

    x [B, T, H, W, C_in], emb [B, T, E] → [B, T, H, W, C_out].
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, *, eps: float = 1e-5,
                 merge_factor: float = 0.5, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(eps=eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        spatial = ResBlock(channels, emb_channels, out_channels, kernel_size=(3, 3), **kw)
        # The spatial block's parameters sit at this module's top level, as in the reference where
        # VideoResBlock subclasses ResBlock.
        self.in_layers, self.emb_layers = spatial.in_layers, spatial.emb_layers
        self.out_layers, self.skip_connection = spatial.out_layers, spatial.skip_connection
        self.time_stack = ResBlock(out_channels, emb_channels, out_channels, kernel_size=(3, 1, 1), **kw)
        self.time_mixer = AlphaBlender(merge_factor, param_dtype=param_dtype)

    def __call__(self, x, emb):
        b, t = x.shape[:2]
        h = ResBlock.__call__(self, x.reshape(b * t, *x.shape[2:]), emb.reshape(b * t, -1))
        h = h.reshape(b, t, *h.shape[1:])
        return self.time_mixer(h, self.time_stack(h, emb))


class Downsample(nnx.Module):
    """3×3 conv with stride 2 and padding 1 (`op`), per frame."""

    def __init__(self, channels: int, *, rngs, dtype=None, param_dtype=jnp.float32):
        self.op = Conv(channels, channels, (3, 3), strides=(2, 2), padding=(1, 1), rngs=rngs,
                       dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        return self.op(x)


def nearest_resize(x, size: tuple[int, int]):
    """Nearest-neighbour resize of [N, H, W, C] with PyTorch's index rule floor(i·in/out)."""
    (h, w), (oh, ow) = x.shape[1:3], size
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]


class Upsample(nnx.Module):
    """Nearest ×2 (or to an explicit size, when a skip has odd size) then 3×3 `conv`, per frame."""

    def __init__(self, channels: int, *, rngs, dtype=None, param_dtype=jnp.float32):
        self.conv = Conv(channels, channels, (3, 3), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, size: tuple[int, int] | None = None):
        if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = nearest_resize(x, size)
        return self.conv(x)
