"""Multi-head attention and the GEGLU feed-forward of the SVD transformers (sgm naming)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax.models.layers import Identity, Linear


def dot_product_attention(q, k, v):
    """q [N, Lq, H, D], k/v [N, Lk, H, D] → [N, Lq, H, D]; softmax(q·kᵀ/√D)·v.

    `jax.nn.dot_product_attention` picks a fused kernel (cuDNN flash attention on GPU) where the
    shapes and dtype allow it and the plain XLA path elsewhere.
    """
    return jax.nn.dot_product_attention(q, k, v)


class CrossAttention(nnx.Module):
    """Attention with q/k/v projections without bias and `to_out.0` with bias.

    Self-attention when `context` is None. Queries and context may have different batch-folding as
    long as their leading dims agree: callers fold frames (or pixels) into the query length when
    every frame attends to the same context, so k/v are computed once per clip, not per frame.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, *,
                 rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads, self.dim_head = heads, dim_head
        self.to_q = Linear(query_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_k = Linear(context_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_v = Linear(context_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
        self.to_out = nnx.List([Linear(inner, query_dim, axes=("heads", "embed"), **kw), Identity()])

    def __call__(self, x, context=None):
        """x [N, L, Cq], context [N, S, Cc] (or None) → [N, L, Cq]."""
        context = x if context is None else context
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim_head)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype))
        out = out.reshape(*out.shape[:-2], self.heads * self.dim_head)
        return self.to_out[0](out)


class GEGLU(nnx.Module):
    """proj → (hidden, gate) halves → hidden · GELU(gate), exact (erf) GELU as PyTorch's default."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs, dtype=None, param_dtype=jnp.float32):
        self.proj = Linear(dim_in, dim_out * 2, axes=("embed", "mlp"), rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)

    def __call__(self, x):
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """`net` = [GEGLU(dim → 4·dim), dropout, Linear(4·dim → dim_out)], indexed like the reference."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, *, rngs, dtype=None,
                 param_dtype=jnp.float32):
        inner = dim * mult
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.net = nnx.List([GEGLU(dim, inner, **kw), Identity(),
                             Linear(inner, dim_out or dim, axes=("mlp", "embed"), **kw)])

    def __call__(self, x):
        for layer in self.net:
            x = layer(x)
        return x
