"""Multi-head attention and the GEGLU feed-forward of the SVD transformers (sgm naming)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax.models.layers import Identity, Linear, dense


@jax.custom_jvp
def softmax(x):
    """Softmax over the last axis, computed exactly as `jax.nn.softmax` (max-shifted exp over its
    sum), with the closed-form derivative y·(ẋ − Σ y·ẋ) (jax's `jax_softmax_custom_jvp` rule):
    the backward pass then needs only y, not the exp/sum/division chain of plain autodiff."""
    unnormalized = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    y = softmax(x)
    return y, y * (x_dot - jnp.sum(y * x_dot, axis=-1, keepdims=True))


def dot_product_attention(q, k, v):
    """q [N, Lq, H, D], k/v [N, Lk, H, D] → [N, Lq, H, D]; softmax(q·kᵀ/√D)·v.

    The forward pass is op for op `jax.nn.dot_product_attention`'s XLA implementation (the only
    one it selects by default): logits in float32, scaled by 1/√D, softmax in float32, cast to
    k's dtype, weighted sum of v. It is written out so that the softmax uses the closed-form
    derivative above and the einsums carry no vmap over head groups, whose transposed layouts and
    exp/sum/division backward cost ~7 % of a CPU training step.
    """
    if q.dtype == jnp.bfloat16:
        precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32
    elif q.dtype == jnp.float16:
        precision = jax.lax.DotAlgorithmPreset.F16_F16_F32
    else:
        precision = None
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32)
    logits = logits * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), logits.dtype)
    probs = softmax(logits.astype(jnp.float32)).astype(k.dtype)
    return jnp.einsum("nhqk,nkhd->nqhd", probs, v)


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
        # proj(x) split into halves, computed as two matmuls on the kernel's halves (the same
        # products and sums), so that no slice of the wide projection output is materialised.
        p = self.proj
        dtype = p.dtype or x.dtype
        kernel, bias = p.kernel[...].astype(dtype), p.bias[...].astype(dtype)
        half = kernel.shape[-1] // 2
        x = x.astype(dtype)
        hidden = dense(x, kernel[:, :half], bias[:half])
        gate = dense(x, kernel[:, half:], bias[half:])
        return hidden * gelu(gate)


def gelu(x):
    """Exact GELU, x·Φ(x) = ½·x·(1 + erf(x/√2)), the formula of PyTorch's `nn.GELU()`.
    (`jax.nn.gelu(approximate=False)` writes Φ with erfc, whose XLA:CPU lowering evaluates two
    branches and an exp per element: ~8 % of a CPU training step. The two agree to ~1e-7.)"""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


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
