"""Memory-efficient attention in plain XLA: query blocks × key blocks with an online softmax.

Forward: for each block of queries, a scan over blocks of keys keeps the running row maximum m,
the running softmax denominator l and the unnormalised output; the logits exist one
[chunk × chunk] block at a time, so memory grows linearly in tokens, not quadratically. The
backward pass is a custom VJP in the same blocked form (FlashAttention's: p = exp(s − lse) is
recomputed per block from the saved log-sum-exp, and dS = P ∘ (dP − rowsum(dO ∘ O))), so it is
linear in tokens as well, and autodiff never sees the scans.

Works on every platform; `keyface_jax.models.attention_backends` uses it where no fused kernel
applies (GPU in fp32, head dims cuDNN does not take, other accelerators).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# Masked logits: finite (exp gives exactly 0 next to any real logit, never NaN from −inf − −inf).
_NEG = -1e30
# Names of the forward results a remat policy can save (keyface_jax/models/remat.py).
OUTPUT_NAME, LSE_NAME = "attention_out", "attention_lse"


def chunked_attention(q, k, v, *, chunk_size: int = 512):
    """softmax(q·kᵀ/√D)·v for q [..., Lq, H, D], k/v [..., Lk, H, D] (same leading dims)."""
    lead = q.shape[:-3]
    flat = lambda t: t.reshape(-1, *t.shape[-3:])
    out = _attention(flat(q), flat(k), flat(v), int(chunk_size))
    return out.reshape(*lead, *out.shape[1:])


def _precision(dtype):
    if dtype == jnp.bfloat16:
        return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
    if dtype == jnp.float16:
        return jax.lax.DotAlgorithmPreset.F16_F16_F32
    return None


def _einsum(spec, a, b):
    return jnp.einsum(spec, a, b, precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def _blocks(x, size: int):
    """[N, L, ...] → [L_pad / size, N, size, ...], zero-padded along L."""
    n, length = x.shape[:2]
    count = -(-length // size)
    x = jnp.pad(x, [(0, 0), (0, count * size - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(n, count, size, *x.shape[2:]), 1, 0)


def _unblock(x, length: int):
    """Inverse of `_blocks`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _key_valid(lk: int, ck: int):
    count = -(-lk // ck)
    return (jnp.arange(count * ck) < lk).reshape(count, ck)


def _sizes(q, k, chunk):
    return min(chunk, q.shape[1]), min(chunk, k.shape[1]), 1.0 / math.sqrt(q.shape[-1])


def _forward(q, k, v, chunk):
    cq, ck, scale = _sizes(q, k, chunk)
    ks, vs, valid = _blocks(k, ck), _blocks(v, ck), _key_valid(k.shape[1], ck)

    def query_block(_, qc):                                      # qc [N, cq, H, D]
        def key_block(carry, xs):
            m, l, acc = carry                                    # [N, H, cq], [N, H, cq], [N, H, cq, D]
            kc, vc, ok = xs
            s = jnp.where(ok, _einsum("nqhd,nkhd->nhqk", qc, kc) * scale, _NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            acc = alpha[..., None] * acc + _einsum("nhqk,nkhd->nhqd", p.astype(vc.dtype), vc)
            return (m_new, alpha * l + p.sum(-1), acc), None

        n, _, h, d = qc.shape
        init = (jnp.full((n, h, cq), _NEG, jnp.float32), jnp.zeros((n, h, cq), jnp.float32),
                jnp.zeros((n, h, cq, d), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(key_block, init, (ks, vs, valid))
        # cast per block: the stacked scan output is then [nq, ...] in v's dtype, not fp32 (the
        # TPU compile of `full` held ten such fp32 stacks live at its peak, 1.25 GB)
        out = (acc / l[..., None]).transpose(0, 2, 1, 3).astype(v.dtype)
        return None, (out, m + jnp.log(l))

    _, (out, lse) = jax.lax.scan(query_block, None, _blocks(q, cq))
    return _unblock(out, q.shape[1]), lse                        # lse [nq, N, H, cq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, chunk):
    return _forward(q, k, v, chunk)[0]


def _attention_fwd(q, k, v, chunk):
    out, lse = _forward(q, k, v, chunk)
    out, lse = checkpoint_name(out, OUTPUT_NAME), checkpoint_name(lse, LSE_NAME)
    return out, (q, k, v, out, lse)


def _attention_bwd(chunk, residuals, dout):
    q, k, v, out, lse = residuals
    cq, ck, scale = _sizes(q, k, chunk)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1)   # [N, Lq, H]
    deltas = _blocks(delta, cq).transpose(0, 1, 3, 2)                          # [nq, N, H, cq]
    ks, vs, valid = _blocks(k, ck), _blocks(v, ck), _key_valid(k.shape[1], ck)
    dtype = q.dtype

    def query_block(carry, xs):
        qc, doc, lse_c, delta_c = xs

        def key_block(dq, ys):
            kc, vc, ok = ys
            s = jnp.where(ok, _einsum("nqhd,nkhd->nhqk", qc, kc) * scale, _NEG)
            p = jnp.exp(s - lse_c[..., None])                    # 0 on padded keys
            dv = _einsum("nhqk,nqhd->nkhd", p.astype(dtype), doc)
            ds = p * (_einsum("nqhd,nkhd->nhqk", doc, vc) - delta_c[..., None])
            dq = dq + _einsum("nhqk,nkhd->nqhd", ds.astype(dtype), kc) * scale
            dk = _einsum("nhqk,nqhd->nkhd", ds.astype(dtype), qc) * scale
            return dq, (dk, dv)

        dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qc.shape, jnp.float32), (ks, vs, valid))
        return (carry[0] + dk, carry[1] + dv), dq.astype(dtype)   # complete: cast per block

    zeros = jnp.zeros(ks.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros),
                                (_blocks(q, cq), _blocks(dout.astype(dtype), cq), lse, deltas))
    return (_unblock(dq, q.shape[1]), _unblock(dk, k.shape[1]).astype(k.dtype),
            _unblock(dv, v.shape[1]).astype(v.dtype))


_attention.defvjp(_attention_fwd, _attention_bwd)
