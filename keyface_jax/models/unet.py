"""The SVD spatio-temporal VideoUNet (sgm `VideoUNet`), channels last, any number of frames.

The attribute tree mirrors the reference's state-dict names (input_blocks.N.M…, middle_block,
output_blocks, time_embed, label_emb, out), so checkpoint import is a leaf rename plus transposes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax import activation_sharding as act
from keyface_jax.models.attention_backends import AttentionConfig
from keyface_jax.models.layers import Conv, GroupNorm, SiLU, mlp_embedding, timestep_embedding
from keyface_jax.models.remat import checkpoint_module, remat_feed_forward, remat_policy
from keyface_jax.models.resnet import Downsample, Upsample, VideoResBlock
from keyface_jax.models.transformer import SpatialVideoTransformer


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a VideoUNet. Per-level tuples are indexed by resolution level (0 = full)."""

    in_channels: int = 8
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    down_attention: tuple[bool, ...] = (True, True, True, False)
    up_attention: tuple[bool, ...] = (True, True, True, False)
    num_heads: tuple[int, ...] = (5, 10, 20, 20)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)
    mid_transformer_depth: int = 1
    mid_num_heads: int = 20
    context_dim: int = 1024
    adm_in_channels: int = 0          # width of the label_emb input y; 0 = no label_emb
    # GroupNorm eps of the residual blocks: 1e-5 everywhere in the reference (sgm); diffusers'
    # port uses 1e-6 in some blocks, so parity runs set these from the diffusers config.
    down_resnet_eps: tuple[float, ...] = (1e-5, 1e-5, 1e-5, 1e-5)
    mid_resnet_eps: float = 1e-5
    up_resnet_eps: tuple[float, ...] = (1e-5, 1e-5, 1e-5, 1e-5)
    out_norm_eps: float = 1e-5
    merge_factor: float = 0.5
    remat: bool = False               # rematerialise each block in the backward pass
    remat_policy: str | None = None   # a name of models/remat.py (None: "block"), or jax.checkpoint_policies
    attention: AttentionConfig = AttentionConfig()   # backend of every attention (attention_backends.py)

    def __post_init__(self):
        remat_policy(self.remat, self.remat_policy)  # unknown policy names fail here
        n = len(self.block_out_channels)
        for name in ("layers_per_block", "down_attention", "up_attention", "num_heads",
                     "transformer_depth", "down_resnet_eps", "up_resnet_eps"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"UNetConfig.{name} has {len(getattr(self, name))} entries, "
                                 f"block_out_channels has {n}")
        for level, (ch, heads) in enumerate(zip(self.block_out_channels, self.num_heads)):
            if ch % 32:
                raise ValueError(f"UNetConfig: level {level} has {ch} channels, not a multiple of 32 "
                                 "(GroupNorm uses 32 groups)")
            if (self.down_attention[level] or self.up_attention[level]) and ch % heads:
                raise ValueError(f"UNetConfig: level {level}: {ch} channels do not split into {heads} heads")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


class VideoUNet(nnx.Module):
    """F(x, c_noise, context, y): x [B, T, H, W, Cin], c_noise [B] or [B, T], context [B, S, D],
    y [B, T, adm] or [B, adm] (added to every frame's time embedding) → [B, T, H, W, Cout]."""

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.config = config
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        chans = config.block_out_channels
        ted = config.time_embed_dim
        self.time_embed = mlp_embedding(chans[0], ted, ted, **kw)
        self.label_emb = (nnx.List([mlp_embedding(config.adm_in_channels, ted, ted, **kw)])
                          if config.adm_in_channels else None)

        def resblock(cin, cout, eps):
            return VideoResBlock(cin, ted, cout, eps=eps, merge_factor=config.merge_factor, **kw)

        remat_ff = remat_feed_forward(config.remat, config.remat_policy)

        def attention(ch, heads, depth):
            return SpatialVideoTransformer(ch, heads, depth, config.context_dim,
                                           merge_factor=config.merge_factor,
                                           attention=config.attention, remat_feed_forward=remat_ff, **kw)

        blocks = [nnx.List([Conv(config.in_channels, chans[0], (3, 3), **kw)])]
        skip_chans, ch = [chans[0]], chans[0]
        for level, out_ch in enumerate(chans):
            for _ in range(config.layers_per_block[level]):
                layers = [resblock(ch, out_ch, config.down_resnet_eps[level])]
                ch = out_ch
                if config.down_attention[level]:
                    layers.append(attention(ch, config.num_heads[level], config.transformer_depth[level]))
                blocks.append(nnx.List(layers))
                skip_chans.append(ch)
            if level != len(chans) - 1:
                blocks.append(nnx.List([Downsample(ch, **kw)]))
                skip_chans.append(ch)
        self.input_blocks = nnx.List(blocks)

        self.middle_block = nnx.List([
            resblock(ch, ch, config.mid_resnet_eps),
            attention(ch, config.mid_num_heads, config.mid_transformer_depth),
            resblock(ch, ch, config.mid_resnet_eps),
        ])

        blocks = []
        for level in reversed(range(len(chans))):
            out_ch = chans[level]
            for i in range(config.layers_per_block[level] + 1):
                layers = [resblock(ch + skip_chans.pop(), out_ch, config.up_resnet_eps[level])]
                ch = out_ch
                if config.up_attention[level]:
                    layers.append(attention(ch, config.num_heads[level], config.transformer_depth[level]))
                if level and i == config.layers_per_block[level]:
                    layers.append(Upsample(ch, **kw))
                blocks.append(nnx.List(layers))
        self.output_blocks = nnx.List(blocks)
        self.out = nnx.List([GroupNorm(ch, eps=config.out_norm_eps, **kw), SiLU(),
                             Conv(ch, config.out_channels, (3, 3), zero_init=True, **kw)])

    def _run_block(self, block, h, emb, context, out_size=None):
        def run(block, h, emb, context):
            for layer in block:
                if isinstance(layer, VideoResBlock):
                    h = layer(h, emb)
                elif isinstance(layer, SpatialVideoTransformer):
                    h = layer(h, context)
                else:  # per-frame conv / resampling: fold frames into the batch
                    b, t = h.shape[:2]
                    flat = h.reshape(b * t, *h.shape[2:])
                    flat = layer(flat, out_size) if isinstance(layer, Upsample) else layer(flat)
                    h = flat.reshape(b, t, *flat.shape[1:])
                h = act.constrain(h, act.VIDEO)  # block boundary: [B, T, H, W, C]
            return h

        enabled, policy = remat_policy(self.config.remat, self.config.remat_policy)
        if not enabled:
            return run(block, h, emb, context)
        return checkpoint_module(block, run, h, emb, context, policy=policy)

    def __call__(self, x, c_noise, context, y=None):
        b, t = x.shape[:2]
        c_noise = jnp.broadcast_to(c_noise.reshape(b, -1), (b, t))
        emb = timestep_embedding(c_noise, self.config.block_out_channels[0])
        for layer in self.time_embed:
            emb = layer(emb)
        if self.label_emb is not None:
            if y is None:
                raise ValueError("VideoUNet: this network has a label_emb; pass y")
            y = y if y.ndim == 3 else jnp.broadcast_to(y[:, None], (b, t, y.shape[-1]))
            for layer in self.label_emb[0]:
                y = layer(y)
            emb = emb + y

        h, skips = x, []
        for block in self.input_blocks:
            h = self._run_block(block, h, emb, context)
            skips.append(h)
        h = self._run_block(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            # An Upsample restores the size of the skip it will meet next (odd sizes round up).
            out_size = tuple(skips[-1].shape[2:4]) if skips else None
            h = self._run_block(block, h, emb, context, out_size)
        flat = h.reshape(b * t, *h.shape[2:])
        for layer in self.out:
            flat = layer(flat)
        return flat.reshape(b, t, *flat.shape[1:])
