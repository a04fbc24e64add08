"""TPU attention through the Pallas splash kernel shipped in `jax.experimental.pallas.ops.tpu`.

The kernel works on one example's [heads, length, head_dim] arrays with lane-aligned shapes, so
this wrapper scales q (the kernel applies no 1/√D), zero-pads the head dim to a multiple of 128
(zero columns change neither q·k nor the kept output columns), pads both lengths to a multiple of
the block size (padded keys are masked out, padded queries dropped) and vmaps over the batch.
It lowers through Mosaic on TPU; `interpret=True` runs the same kernel as plain JAX ops (CPU tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from keyface_jax.models.chunked_attention import LSE_NAME

LANES = 128          # TPU vector lane width: head dims and blocks are multiples of it
MAX_BLOCK = 512      # query / key block (VMEM tiles of 512 × 128 bf16 = 128 KiB)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block(padded_length: int) -> int:
    return next(b for b in (MAX_BLOCK, 256, LANES) if padded_length % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, lq: int, lk: int, real_lk: int, interpret: bool):
    """A splash multi-head kernel for padded lengths (lq, lk) whose keys ≥ real_lk are masked."""
    # Imported here: other platforms' JAX builds need not carry the TPU kernels.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    if real_lk == lk:
        mask = mask_lib.FullMask((lq, lk))
    else:
        mask = mask_lib.NumpyMask(np.broadcast_to(np.arange(lk) < real_lk, (lq, lk)).copy())
    bq, bk = _block(lq), _block(lk)
    sizes = kernel_lib.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                                  block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                                  block_kv_dq=bk)
    # The kernel holds its mask's block tables as arrays: make them constants, not values of the
    # trace that happens to build the (cached) kernel first.
    with jax.ensure_compile_time_eval():
        return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                          head_shards=1, q_seq_shards=1, interpret=interpret,
                                          residual_checkpoint_name=LSE_NAME)  # kept by remat policies


def splash_attention(q, k, v, *, interpret: bool = False):
    """softmax(q·kᵀ/√D)·v for q [N, Lq, H, D], k/v [N, Lk, H, D] → [N, Lq, H, D]."""
    n, lq, heads, d = q.shape
    lk = k.shape[1]
    dp = _round_up(d, LANES)
    lq_p, lk_p = _round_up(lq, LANES), _round_up(lk, LANES)   # blocks: the largest of 512/256/128 dividing

    def prepare(t, length):  # [N, L, H, D] → [N, H, L_pad, D_pad]
        t = jnp.pad(t, ((0, 0), (0, length - t.shape[1]), (0, 0), (0, dp - d)))
        return t.transpose(0, 2, 1, 3)

    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    kernel = _kernel(heads, lq_p, lk_p, lk, bool(interpret))
    out = jax.vmap(kernel)(prepare(q, lq_p), prepare(k, lk_p), prepare(v, lk_p))
    return out.transpose(0, 2, 1, 3)[:, :lq, :, :d]
