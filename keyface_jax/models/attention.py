"""Multi-head attention and the GEGLU feed-forward of the SVD transformers (sgm naming).

The attention op itself (backends: materialised XLA, chunked, cuDNN, TPU splash) is
`keyface_jax.models.attention_backends.dot_product_attention`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from keyface_jax import activation_sharding as act
from keyface_jax.models.attention_backends import DEFAULT, AttentionConfig, dot_product_attention
from keyface_jax.models.chunked_attention import OUTPUT_NAME
from keyface_jax.models.layers import Identity, Linear, dense
from keyface_jax.models.remat import checkpoint_module


class CrossAttention(nnx.Module):
    """Attention with q/k/v projections without bias and `to_out.0` with bias.

    Self-attention when `context` is None. Queries and context may have different batch-folding as
    long as their leading dims agree: callers fold frames (or pixels) into the query length when
    every frame attends to the same context, so k/v are computed once per clip, not per frame
    (or pass `context_repeats` = frames per clip: the clip's k/v are then repeated per frame).
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, *,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 attention: AttentionConfig = DEFAULT):
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, num_heads=heads)
        self.heads, self.dim_head, self.attention = heads, dim_head, attention
        self.to_q = Linear(query_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_k = Linear(context_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_v = Linear(context_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_out = nnx.List([Linear(inner, query_dim, axes=("heads", "embed"), **kw), Identity()])

    def __call__(self, x, context=None, *, names: Sequence[str | None] | None = None,
                 context_repeats: int = 1):
        """x [..., L, Cq], context [..., S, Cc] (or None) → [..., L, Cq]. `names`: logical names of
        x's leading and length dims (activation sharding); `context_repeats`: x's first dim is the
        context's times this (k/v repeated to match)."""
        context = x if context is None else context
        tensor = act.axis_size("act_heads")
        if self.heads % tensor:
            raise ValueError(f"CrossAttention ({self.heads} heads × {self.dim_head}): the heads do not "
                             f"split over the {tensor} devices of the 'act_heads' rule; tensor "
                             "parallelism needs heads % tensor == 0")
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim_head)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        if context_repeats > 1:
            k, v = (jnp.repeat(t, context_repeats, axis=0) for t in (k, v))
        if names is not None:  # heads split over `tensor`; keys whole along their length
            q = act.constrain(q, (*names, "act_heads", None))
            k, v = (act.constrain(t, (*names[:-1], None, "act_heads", None)) for t in (k, v))
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), self.attention, names)
        out = checkpoint_name(out, OUTPUT_NAME)
        out = out.reshape(*out.shape[:-2], self.heads * self.dim_head)
        return self.to_out[0](out)


class GEGLU(nnx.Module):
    """proj → (hidden, gate) halves → hidden · GELU(gate), exact (erf) GELU as PyTorch's default."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs, dtype=None, param_dtype=jnp.float32):
        self.proj = Linear(dim_in, dim_out * 2, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)

    def __call__(self, x):
        # proj(x) split into halves, computed as two matmuls on the kernel's halves (the same
        # products and sums), so that no slice of the wide projection output is materialised.
        p = self.proj
        dtype = p.dtype or x.dtype
        kernel, bias = p.kernel[...].astype(dtype), p.bias[...].astype(dtype)
        x = x.astype(dtype)
        if act.axis_size("act_mlp") > 1:
            # Tensor parallel: the stored [in, 2·inner] kernel is split over devices in contiguous
            # column blocks (with 2 devices: one holds the hidden half, the other the gate half).
            # Viewed as [in, 2, inner] and laid out along `inner`, every device holds matching
            # hidden and gate columns, and hidden · GELU(gate) needs no communication. The stored
            # layout (and so every checkpoint) is unchanged.
            kernel = act.constrain(kernel.reshape(kernel.shape[0], 2, -1), (act.ANY, None, "act_mlp"))
            bias = act.constrain(bias.reshape(2, -1), (None, "act_mlp"))
            hidden, gate = dense(x, kernel[:, 0], bias[0]), dense(x, kernel[:, 1], bias[1])
        else:
            half = kernel.shape[-1] // 2
            hidden = dense(x, kernel[:, :half], bias[:half])
            gate = dense(x, kernel[:, half:], bias[half:])
        return hidden * gelu(gate)


def gelu(x):
    """Exact GELU, x·Φ(x) = ½·x·(1 + erf(x/√2)), the formula of PyTorch's `nn.GELU()`.
    (`jax.nn.gelu(approximate=False)` writes Φ with erfc, whose XLA:CPU lowering evaluates two
    branches and an exp per element: ~8 % of a CPU training step. The two agree to ~1e-7.)"""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


class FeedForward(nnx.Module):
    """`net` = [GEGLU(dim → 4·dim), dropout, Linear(4·dim → dim_out)], indexed like the reference.
    With `remat` it runs under a checkpoint of its own (the `block_ffn` remat policy)."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, *, rngs, dtype=None,
                 param_dtype=jnp.float32, remat: bool = False):
        self.remat = remat
        inner = dim * mult
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.net = nnx.List([GEGLU(dim, inner, **kw), Identity(),
                             Linear(inner, dim_out or dim, axes=("mlp", "embed"), **kw)])

    def __call__(self, x):
        if self.remat:
            return checkpoint_module(self, FeedForward._apply, x,
                                     policy=jax.checkpoint_policies.nothing_saveable)
        return self._apply(x)

    def _apply(self, x):
        for layer in self.net:
            x = layer(x)
        return x
