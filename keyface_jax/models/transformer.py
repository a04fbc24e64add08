"""SpatialVideoTransformer: a spatial transformer per frame, a temporal one per pixel, α-merged.

Under activation sharding with a clip's tokens split over devices (`context` axis), the blocks keep
the token dim apart wherever the single-device form folds it with another dim (see
`activation_sharding.tokens_sharded`); both forms compute the same products and sums.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from keyface_jax import activation_sharding as act
from keyface_jax.models.attention import CrossAttention, FeedForward
from keyface_jax.models.attention_backends import DEFAULT, AttentionConfig
from keyface_jax.models.layers import GroupNorm, LayerNorm, Linear, mlp_embedding, timestep_embedding
from keyface_jax.models.resnet import AlphaBlender


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention over the context, GEGLU feed-forward; pre-LN residuals."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, *, rngs, dtype=None,
                 param_dtype=jnp.float32, attention: AttentionConfig = DEFAULT,
                 remat_feed_forward: bool = False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.attn1 = CrossAttention(dim, heads, dim_head, attention=attention, **kw)
        self.ff = FeedForward(dim, remat=remat_feed_forward, **kw)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, attention=attention, **kw)
        self.norm1, self.norm2, self.norm3 = (LayerNorm(dim, **kw) for _ in range(3))

    def __call__(self, x, context):
        """x [B, T, L, C] (frames of a clip), context [B, S, Cc] shared by the clip's frames."""
        b, t, l, c = x.shape
        frames = ("act_batch", "act_tokens")  # [B·T, L]
        x = self.attn1(self.norm1(x).reshape(b * t, l, c), names=frames).reshape(x.shape) + x
        if act.tokens_sharded():  # per frame, the clip's k/v repeated for each of its frames
            y = self.attn2(self.norm2(x).reshape(b * t, l, c), context, names=frames, context_repeats=t)
        else:  # every frame attends to the same clip context: fold frames into the query length
            y = self.attn2(self.norm2(x).reshape(b, t * l, c), context, names=("act_batch", None))
        x = y.reshape(x.shape) + x
        return act.constrain(self.ff(self.norm3(x)) + x, act.TOKENS)


class VideoTransformerBlock(nnx.Module):
    """Temporal block over the frames of each pixel: GEGLU `ff_in` (extra_ff_mix_layer), temporal
    self-attention, cross-attention over the clip context, feed-forward; all residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, *, rngs, dtype=None,
                 param_dtype=jnp.float32, attention: AttentionConfig = DEFAULT,
                 remat_feed_forward: bool = False):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm_in = LayerNorm(dim, **kw)
        self.ff_in = FeedForward(dim, dim, remat=remat_feed_forward, **kw)
        self.attn1 = CrossAttention(dim, heads, dim_head, attention=attention, **kw)
        self.ff = FeedForward(dim, dim, remat=remat_feed_forward, **kw)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, attention=attention, **kw)
        self.norm1, self.norm2, self.norm3 = (LayerNorm(dim, **kw) for _ in range(3))

    def __call__(self, x, context):
        """x [B, L, T, C] (pixels × frames), context [B, S, Cc] → [B, L, T, C]."""
        b, l, t, c = x.shape
        x = self.ff_in(self.norm_in(x)) + x
        if act.tokens_sharded():  # pixels stay a dim of their own: [B, L, T]
            y = self.attn1(self.norm1(x), names=("act_batch", "act_tokens", None))
        else:
            y = self.attn1(self.norm1(x).reshape(b * l, t, c), names=("act_batch", None))
        x = y.reshape(x.shape) + x
        # The reference repeats the first frame's context over all pixels: fold pixels into queries
        # (pixel-major, so a split of the pixels is a split of the folded length).
        x = self.attn2(self.norm2(x).reshape(b, l * t, c), context,
                       names=("act_batch", "act_tokens")).reshape(x.shape) + x
        return act.constrain(self.ff(self.norm3(x)) + x, act.PIXEL_TOKENS)


class SpatialVideoTransformer(nnx.Module):
    """GroupNorm → proj_in → per depth: spatial block, frame-position embedding + temporal block,
    α-merge → proj_out (zero-init) + residual. x [B, T, H, W, C] → same shape."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, *,
                 merge_factor: float = 0.5, rngs, dtype=None, param_dtype=jnp.float32,
                 attention: AttentionConfig = DEFAULT, remat_feed_forward: bool = False):
        if channels % heads:
            raise ValueError(f"SpatialVideoTransformer: {channels} channels do not split into {heads} heads")
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        dim_head = channels // heads
        self.channels = channels
        self.norm = GroupNorm(channels, eps=1e-6, **kw)
        self.proj_in = Linear(channels, channels, **kw)
        blocks = dict(attention=attention, remat_feed_forward=remat_feed_forward, **kw)
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(channels, heads, dim_head, context_dim, **blocks) for _ in range(depth)])
        self.time_stack = nnx.List(
            [VideoTransformerBlock(channels, heads, dim_head, context_dim, **blocks) for _ in range(depth)])
        self.time_pos_embed = mlp_embedding(channels, 4 * channels, channels, **kw)
        self.time_mixer = AlphaBlender(merge_factor, param_dtype=param_dtype)
        self.proj_out = Linear(channels, channels, zero_init=True, **kw)

    def __call__(self, x, context):
        b, t, hgt, wid, c = x.shape
        h = self.norm(x.reshape(b * t, hgt, wid, c)).reshape(b, t, hgt * wid, c)
        h = self.proj_in(h)
        frame_emb = timestep_embedding(jnp.arange(t), c)
        for layer in self.time_pos_embed:
            frame_emb = layer(frame_emb)
        frame_emb = frame_emb.astype(h.dtype)[None, :, None, :]  # [1, T, 1, C]
        for spatial, temporal in zip(self.transformer_blocks, self.time_stack):
            h = spatial(h, context)
            mixed = (h + frame_emb).transpose(0, 2, 1, 3)  # [B, L, T, C]
            mixed = temporal(mixed, context).transpose(0, 2, 1, 3)
            h = self.time_mixer(h, mixed)
        h = self.proj_out(h)
        return h.reshape(x.shape) + x
