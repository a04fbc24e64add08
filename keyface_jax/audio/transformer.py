"""The transformer encoder shared by WavLM, wav2vec2 and BEATs (fairseq design, HF attribute names).

    encoder: x [B, L, D] → zero the padded tokens → x + GELU(grouped conv over time) (the
             "convolutional positional embedding") → [LayerNorm] → layers → [LayerNorm]

Each layer is multi-head self-attention plus a GELU feed-forward, post-LN (Base models:
`LN(α·x + attn(x))`, `LN(α·x + ffn(x))`) or pre-LN (Large models, `layer_norm_first`). The three
encoders differ only in switches of `EncoderConfig`:

- wav2vec2: no relative position bias, α = 1.
- WavLM: a bucketed relative position bias (one embedding, in layer 0, computed once and shared by
  every layer), scaled per layer, head and query by a gate computed from the layer's *input*
  split into heads: sigmoid(Linear(head_dim → 8)) summed in two groups of 4 → (a, b),
  gate = a·(b·c − 1) + 2 with a learned per-head c.
- BEATs: the same bias and gate, except that the gate reads the *projected queries* q_proj(x)
  (its reference has no fused attention path), and deep-norm residuals α = (2·layers)^¼.

Padded tokens (beyond each item's valid length) are zeroed before the positional convolution and
masked as keys, so valid outputs equal those of the unpadded sequence. Long sequences are
attended in query blocks, so memory grows as L·block, not L².

Parameters mirror the transformers module tree (`encoder.layers.3.attention.q_proj.kernel` ↔
`encoder.layers.3.attention.q_proj.weight`), so `keyface_jax.conversion.nnx_torch` loads them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from keyface_jax.models.attention import gelu
from keyface_jax.models.attention_backends import softmax
from keyface_jax.models.layers import LayerNorm, Linear, logical_param

ATTENTION_BLOCK = 1024        # query rows attended at once when a sequence is longer than 2 blocks
_MASKED = -1e30               # finite: a fully padded item gives uniform weights, not NaN


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    layer_norm_first: bool = False    # pre-LN layers + a final LayerNorm (Large models)
    num_buckets: int = 0              # relative position buckets; 0: no relative bias (wav2vec2)
    max_distance: int = 800
    gated_bias: bool = False          # WavLM/BEATs gate on the relative bias
    gate_from_query: bool = False     # BEATs: the gate reads q_proj(x), WavLM reads x
    residual_scale: float = 1.0       # BEATs deep-norm α; 1 for WavLM/wav2vec2
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"{self.num_heads} heads")
        if self.hidden_size % self.pos_conv_groups:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"{self.pos_conv_groups} positional-convolution groups")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; "
                             f"supported: {sorted(ACTIVATIONS)}")
        if self.gated_bias and not self.num_buckets:
            raise ValueError("gated_bias needs a relative position bias (num_buckets > 0)")


ACTIVATIONS = {"gelu": gelu, "relu": jax.nn.relu}


def relative_position_buckets(relative: np.ndarray, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """Bidirectional log-bucketed relative positions (memory − query), as WavLM/BEATs compute
    them: float32 logs, truncation toward zero. Host-side numpy (the offsets are static)."""
    half = num_buckets // 2
    exact = half // 2
    rel = np.asarray(relative, np.int64)
    base = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    large = (np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
             / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum((np.float32(exact) + large).astype(np.int64), half - 1)
    return base + np.where(dist < exact, dist, large)


class Embedding(nnx.Module):
    """A lookup table named like torch's nn.Embedding (`weight` [num, dim])."""

    def __init__(self, num: int, dim: int):
        self.weight = logical_param(None, nnx.initializers.zeros, (num, dim), jnp.float32,
                                    (None, None))


class GroupedConv1d(nnx.Module):
    """Conv1d over [B, L, C] with `groups`, symmetric padding k//2, kernel [k, C/groups, C]."""

    def __init__(self, channels: int, kernel: int, groups: int):
        self.groups = groups
        self.kernel = logical_param(None, nnx.initializers.zeros,
                                    (kernel, channels // groups, channels), jnp.float32,
                                    (None, None, None))
        self.bias = logical_param(None, nnx.initializers.zeros, (channels,), jnp.float32, (None,))

    def __call__(self, x):
        k = self.kernel.shape[0]
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), window_strides=(1,), padding=[(k // 2, k // 2)],
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=self.groups)
        y = y + self.bias[...].astype(x.dtype)
        return y[:, :x.shape[1]]          # an even kernel gives one extra step (torch SamePad)


class PositionalConvEmbedding(nnx.Module):
    def __init__(self, cfg: EncoderConfig):
        self.conv = GroupedConv1d(cfg.hidden_size, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.activation = ACTIVATIONS[cfg.activation]

    def __call__(self, x):
        return self.activation(self.conv(x))


def _linear(n_in: int, n_out: int, dtype) -> Linear:
    return Linear(n_in, n_out, rngs=None, axes=(None, None), zero_init=True, dtype=dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, has_bias_table: bool, dtype=None):
        d, h = cfg.hidden_size, cfg.num_heads
        self.num_heads, self.gate_from_query = h, cfg.gate_from_query
        self.q_proj, self.k_proj = _linear(d, d, dtype), _linear(d, d, dtype)
        self.v_proj, self.out_proj = _linear(d, d, dtype), _linear(d, d, dtype)
        if cfg.gated_bias:
            self.gru_rel_pos_const = logical_param(None, nnx.initializers.ones, (1, h, 1, 1),
                                                   jnp.float32, (None,) * 4)
            self.gru_rel_pos_linear = _linear(d // h, 8, dtype)
        else:
            self.gru_rel_pos_const = self.gru_rel_pos_linear = None
        self.rel_attn_embed = Embedding(cfg.num_buckets, h) if has_bias_table else None

    def gate(self, x, q):
        """[B, L, H, hd] → [B, H, L] multiplier of the relative bias."""
        src = q if self.gate_from_query else x.reshape(q.shape)
        g = jax.nn.sigmoid(self.gru_rel_pos_linear(src).reshape(*q.shape[:3], 2, 4).sum(-1)
                           .astype(jnp.float32))
        const = self.gru_rel_pos_const[...].reshape(1, 1, -1)
        return jnp.moveaxis(g[..., 0] * (g[..., 1] * const - 1.0) + 2.0, 2, 1)

    def __call__(self, x, key_valid, bias_table):
        b, n, d = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        gate = (self.gate(x, q) if bias_table is not None and self.gru_rel_pos_linear is not None
                else None)
        out = attend(q, k, v, key_valid, bias_table, gate)
        return self.out_proj(out.reshape(b, n, d))


def attend(q, k, v, key_valid, bias_table=None, gate=None, block: int = ATTENTION_BLOCK):
    """softmax(q·kᵀ/√hd + gate ⊙ bias + mask)·v.

    Args:
      q, k, v: [B, L, H, hd].
      key_valid: [B, L] bool, False for padded keys.
      bias_table: [H, 2L − 1] bias per relative offset (memory − query + L − 1), or None.
      gate: [B, H, L] per-query multiplier of the bias, or None.
    Returns [B, L, H, hd]. Logits and softmax in float32.
    """
    n = q.shape[1]
    mask = jnp.where(key_valid, 0.0, _MASKED).astype(jnp.float32)[:, None, None, :]
    scale = 1.0 / math.sqrt(q.shape[-1])
    keys = jnp.arange(n)
    # heads-major [B, H, L, hd] once, then plain batched matmuls (≈ 30 % faster on XLA:CPU than
    # einsums that keep the head axis inside)
    k_t = jnp.transpose(k, (0, 2, 3, 1))                                      # [B, H, hd, L]
    v_h = jnp.transpose(v, (0, 2, 1, 3))                                      # [B, H, L, hd]

    def rows(q_blk, start, gate_blk):
        q_h = jnp.transpose(q_blk, (0, 2, 1, 3))
        logits = jnp.matmul(q_h, k_t, preferred_element_type=jnp.float32) * scale + mask
        if bias_table is not None:
            offsets = keys[None, :] - (start + jnp.arange(q_blk.shape[1]))[:, None] + n - 1
            bias = bias_table[:, offsets]                                   # [H, q, L]
            logits = logits + (bias[None] if gate_blk is None else gate_blk[..., None] * bias)
        probs = softmax(logits).astype(v.dtype)
        return jnp.transpose(jnp.matmul(probs, v_h), (0, 2, 1, 3))

    if n <= 2 * block:
        return rows(q, 0, gate)
    nblk = -(-n // block)
    pad = nblk * block - n
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    qb = jnp.moveaxis(qb.reshape(q.shape[0], nblk, block, *q.shape[2:]), 1, 0)
    starts = jnp.arange(nblk) * block
    if gate is None:
        out = jax.lax.map(lambda a: rows(a[0], a[1], None), (qb, starts))
    else:
        gb = jnp.pad(gate, ((0, 0), (0, 0), (0, pad)))
        gb = jnp.moveaxis(gb.reshape(*gate.shape[:2], nblk, block), 2, 0)
        out = jax.lax.map(lambda a: rows(a[0], a[1], a[2]), (qb, starts, gb))
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], nblk * block, *q.shape[2:])
    return out[:, :n]


class FeedForward(nnx.Module):
    def __init__(self, cfg: EncoderConfig, dtype=None):
        self.intermediate_dense = _linear(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.output_dense = _linear(cfg.intermediate_size, cfg.hidden_size, dtype)
        self.activation = ACTIVATIONS[cfg.activation]

    def __call__(self, x):
        return self.output_dense(self.activation(self.intermediate_dense(x)))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, index: int, dtype=None):
        self.pre_ln, self.alpha = cfg.layer_norm_first, cfg.residual_scale
        self.attention = Attention(cfg, has_bias_table=index == 0 and cfg.num_buckets > 0,
                                   dtype=dtype)
        eps = cfg.layer_norm_eps
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.feed_forward = FeedForward(cfg, dtype)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=eps, dtype=dtype)

    def __call__(self, x, key_valid, bias_table):
        if self.pre_ln:
            x = x + self.attention(self.layer_norm(x), key_valid, bias_table)
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x * self.alpha + self.attention(x, key_valid, bias_table))
        return self.final_layer_norm(x * self.alpha + self.feed_forward(x))


class TransformerEncoder(nnx.Module):
    """x [B, L, D], valid [B, L] bool → [B, L, D] (rows of padded tokens are meaningless)."""

    def __init__(self, cfg: EncoderConfig, dtype=None):
        self.cfg = cfg
        self.pos_conv_embed = PositionalConvEmbedding(cfg)
        self.layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.layers = nnx.List([EncoderLayer(cfg, i, dtype) for i in range(cfg.num_layers)])

    def bias_table(self, length: int):
        """[H, 2L − 1]: the ungated relative bias per offset, from layer 0's embedding."""
        if not self.cfg.num_buckets:
            return None
        buckets = relative_position_buckets(np.arange(-(length - 1), length),
                                            self.cfg.num_buckets, self.cfg.max_distance)
        table = self.layers[0].attention.rel_attn_embed.weight[...]
        return jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=0).T.astype(jnp.float32)

    def __call__(self, x, valid):
        x = jnp.where(valid[..., None], x, 0)
        x = x + self.pos_conv_embed(x)
        if not self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        bias = self.bias_table(x.shape[1])
        for layer in self.layers:
            x = layer(x, valid, bias)
        if self.cfg.layer_norm_first:
            x = self.layer_norm(x)
        return x
