"""Basic NNX layers shared by every network: linear, conv, norms, activations, sinusoids.

Conventions (all networks):
- Activations are channels-last: images [N, H, W, C], videos [B, T, H, W, C].
- Parameter names follow PyTorch's roles so that importers only rename leaves: `kernel`
  (Linear/Conv weights, transposed to (in, out) / HWIO / DHWIO), `scale` (norm weights), `bias`.
- Every parameter carries logical axis names (`out_sharding` metadata, no eager sharding), which
  `keyface_jax.sharding` maps onto a device mesh with a rules table.
- `dtype` is the compute dtype (e.g. bf16); `param_dtype` the storage dtype (fp32 master weights).
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax import activation_sharding as act
from keyface_jax.models.row_split_conv import row_split_conv

Axes = tuple[str | None, ...]


_key_streams: "weakref.WeakKeyDictionary[nnx.Rngs, list]" = weakref.WeakKeyDictionary()


def _next_key(rngs: nnx.Rngs) -> jax.Array:
    """A fresh key per parameter from a Python-side counter over the Rngs' base key.

    `rngs.params()` updates an NNX counter variable, which under `nnx.eval_shape` of the 1.5 B
    parameter model costs ~65 ms a call (over a minute per build); this costs nothing.
    """
    stream = _key_streams.get(rngs)
    if stream is None:
        stream = _key_streams[rngs] = [rngs.params(), 0]
    stream[1] += 1
    return jax.random.fold_in(stream[0], stream[1])


def logical_param(rngs: nnx.Rngs | None, init, shape: Sequence[int], dtype, axes: Axes,
                  **metadata) -> nnx.Param:
    """A parameter with logical axis names; `rngs=None` initialises deterministically (zeros/ones
    inits). Extra `metadata` (e.g. `num_heads` of an attention projection) rides along for checks."""
    key = _next_key(rngs) if rngs is not None else jax.random.key(0)
    value = init(key, tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False, **metadata)


def _cast(x, dtype):
    return x if dtype is None else x.astype(dtype)


class Identity(nnx.Module):
    """Stands where the reference has a parameter-free layer (dropout at rate 0, activations
    applied elsewhere) so that list indices mirror the PyTorch `nn.Sequential` ones."""

    def __call__(self, x):
        return x


class SiLU(nnx.Module):
    def __call__(self, x):
        return jax.nn.silu(x)


class Linear(nnx.Module):
    """y = x @ kernel + bias; kernel is (in, out). `num_heads`: the attention heads an (embed,
    heads) / (heads, embed) kernel holds, checked against the mesh by `sharding.param_shardings`."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
                 axes: Axes = ("embed", "mlp"), zero_init: bool = False,
                 dtype=None, param_dtype=jnp.float32, num_heads: int | None = None):
        kinit = nnx.initializers.zeros if zero_init else nnx.initializers.lecun_normal()
        meta = {} if num_heads is None else dict(num_heads=num_heads)
        self.kernel = logical_param(rngs, kinit, (in_features, out_features), param_dtype, axes, **meta)
        self.bias = (logical_param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, (axes[1],))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        return dense(_cast(x, dtype), self.kernel[...].astype(dtype),
                     None if self.bias is None else self.bias[...].astype(dtype))


def dense(x, kernel, bias=None):
    """x [..., in] @ kernel [in, out] (+ bias) as one 2-D matmul over the flattened leading dims.

    Same products and sums as `jnp.dot` on the N-d array; the 2-D form matters for the backward
    pass on XLA:CPU, which lowers the kernel gradient of an N-d dot (a contraction over all the
    leading dims) to transposed copies of the activations plus its slow generic dot, while the 2-D
    form gives one canonical GEMM (≈ 20 % of a CPU training step; no effect on accelerators).
    When a clip's tokens are split over devices (`context` axis) the leading dims stay apart: their
    fold would not be a tiling of the folded dim, and the partitioner would gather x to make it."""
    if act.tokens_sharded():
        y = jnp.einsum("...i,io->...o", x, kernel)
        return y if bias is None else y + bias
    lead = x.shape[:-1]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    y = y.reshape(*lead, kernel.shape[-1])
    return y if bias is None else y + bias


class Conv(nnx.Module):
    """N-d convolution, channels last. kernel_size (3, 3) → HWIO kernel on [N, H, W, C];
    (3, 1, 1) → DHWIO kernel on [N, T, H, W, C]. Padding is symmetric `k // 2` unless given."""

    def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *,
                 rngs: nnx.Rngs, strides: Sequence[int] | None = None,
                 padding: Sequence[int] | None = None, use_bias: bool = True,
                 zero_init: bool = False, dtype=None, param_dtype=jnp.float32):
        kernel_size = tuple(kernel_size)
        self.strides = tuple(strides or (1,) * len(kernel_size))
        self.padding = tuple(padding if padding is not None else (k // 2 for k in kernel_size))
        kinit = nnx.initializers.zeros if zero_init else nnx.initializers.lecun_normal()
        spatial_axes = (None,) * len(kernel_size)
        self.kernel = logical_param(rngs, kinit, (*kernel_size, in_features, out_features), param_dtype,
                                    (*spatial_axes, "conv_in", "conv_out"))
        self.bias = (logical_param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, ("conv_out",))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        x, kernel = _cast(x, dtype), self.kernel[...].astype(dtype)
        ctx = act.current()
        split = (ctx is not None and kernel.ndim == 4 and
                 row_split_conv(ctx, x, kernel, self.strides, self.padding))
        if split is not None and split is not False:
            y = split
        elif self._is_temporal_only():
            y = self._temporal_as_2d(x, kernel)
        else:
            nd = kernel.ndim - 2
            spatial = "DHW"[-nd:] if nd <= 3 else None
            dn = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=self.strides,
                padding=[(p, p) for p in self.padding], dimension_numbers=dn)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y

    def _is_temporal_only(self) -> bool:
        """A (k, 1, 1) kernel on [N, T, H, W, C] with unit strides and no spatial padding."""
        return (self.kernel.ndim == 5 and tuple(self.kernel.shape[1:3]) == (1, 1)
                and self.strides == (1, 1, 1) and tuple(self.padding[1:]) == (0, 0))

    def _temporal_as_2d(self, x, kernel):
        """The (k, 1, 1) convolution as a 2-D one with a (k, 1) window over [N, T, H·W, C]: the
        same products and sums (each pixel only meets itself in other frames), but XLA:CPU runs
        2-D convolutions through its fast library path and 3-D ones through a slow generic loop."""
        n, t, h, w, c = x.shape
        k = kernel.shape[0]
        y = jax.lax.conv_general_dilated(
            x.reshape(n, t, h * w, c), kernel.reshape(k, 1, *kernel.shape[3:]), window_strides=(1, 1),
            padding=[(self.padding[0], self.padding[0]), (0, 0)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(n, y.shape[1], h, w, y.shape[-1])


class GroupNorm(nnx.Module):
    """GroupNorm over every axis but the leading one, channels last.

    The caller chooses what is normalised together by the shape it passes: a spatial block passes
    frames folded into the batch [B*T, H, W, C]; a temporal block passes [B, T, H, W, C] so that
    statistics span the whole clip, as PyTorch's GroupNorm on (B, C, T, H, W) does.
    Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, num_channels: int, *, num_groups: int = 32, eps: float = 1e-5,
                 rngs: nnx.Rngs | None = None, dtype=None, param_dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = logical_param(None, nnx.initializers.ones, (num_channels,), param_dtype, ("norm",))
        self.bias = logical_param(None, nnx.initializers.zeros, (num_channels,), param_dtype, ("norm",))
        self.dtype = dtype

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        c = x.shape[-1]
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, xg.ndim - 2)) + (xg.ndim - 1,)
        mean = xg.mean(axis=axes, keepdims=True)
        var = jnp.square(xg - mean).mean(axis=axes, keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (PyTorch defaults: affine, eps 1e-5), stats in float32."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, rngs: nnx.Rngs | None = None,
                 dtype=None, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = logical_param(None, nnx.initializers.ones, (num_features,), param_dtype, ("norm",))
        self.bias = logical_param(None, nnx.initializers.zeros, (num_features,), param_dtype, ("norm",))
        self.dtype = dtype

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)


def run_sequence(layers: nnx.List, x):
    """Applies the modules of a list in order (the NNX stand-in for `nn.Sequential`)."""
    for layer in layers:
        x = layer(x)
    return x


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding [cos | sin] of a float array t [...] → [..., dim] (sgm/diffusers order).

    Frequencies exp(-ln(max_period) * i / half), i < half; an odd `dim` gets a zero last column.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb


def mlp_embedding(in_dim: int, hidden: int, out_dim: int, *, rngs, dtype, param_dtype) -> nnx.List:
    """Linear → SiLU → Linear as a list indexed 0, 1, 2 like the reference's Sequential."""
    return nnx.List([
        Linear(in_dim, hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype),
        SiLU(),
        Linear(hidden, out_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype),
    ])
