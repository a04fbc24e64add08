"""Scaled dot-product attention behind one function, with the backend chosen per call.

Every attention of the networks (the UNet's spatial, temporal and cross attention, the
autoencoder's mid-block attention) calls `dot_product_attention(q, k, v, config, names)`. The
config names a backend or `auto`:

| backend   | what                                                         | memory     | runs on     |
|-----------|--------------------------------------------------------------|------------|-------------|
| `xla`     | logits materialised, closed-form softmax derivative (the     | O(Lq·Lk)   | all         |
|           | CPU-tuned reference form)                                    |            |             |
| `chunked` | query × key blocks, online softmax, blocked custom VJP       | O(Lq + Lk) | all         |
| `cudnn`   | `jax.nn.dot_product_attention(implementation="cudnn")`       | O(Lq + Lk) | GPU: bf16/  |
|           |                                                              |            | fp16, D≤128 |
| `splash`  | Pallas splash kernel (head dim padded to 128)                | O(Lq + Lk) | TPU (or     |
|           |                                                              |            | interpret)  |

Selection (after MaxDiffusion's `attention_flax.py`: a registry, a minimum sequence length below
which plain XLA is used, head-dim padding for the TPU kernel):
- a query or key sequence shorter than `min_seq_length` always takes `xla` (temporal attention over
  14 frames, cross-attention to 14 audio tokens: their logits are small and the kernels would pad
  them to a block);
- a named backend is used as named, or fails with an error saying why it cannot run this call;
- `auto`: CPU → `xla`; GPU → `cudnn` where it applies, else `chunked`; TPU → `splash`; other → `chunked`.

Fused backends run per device under `shard_map` when an activation-sharding context is active
(batch and heads split as the rules say, queries split over `context`, keys and values gathered).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from keyface_jax import activation_sharding as act
from keyface_jax.models.chunked_attention import chunked_attention
from keyface_jax.models.splash_attention import splash_attention


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """`backend`: auto | xla | chunked | cudnn | splash. `min_seq_length`: shorter query or key
    sequences use `xla`. `chunk_size`: block of the `chunked` form. `interpret`: run Pallas kernels
    in interpret mode (tests on CPU)."""

    backend: str = "auto"
    min_seq_length: int = 1024
    chunk_size: int = 512
    interpret: bool = False

    def __post_init__(self):
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"attention backend {self.backend!r}: choose auto or one of {sorted(BACKENDS)}")
        if self.chunk_size < 1 or self.min_seq_length < 0:
            raise ValueError(f"attention: chunk_size {self.chunk_size} must be >= 1 and min_seq_length "
                             f"{self.min_seq_length} >= 0")


# ----------------------------------------------------------------------------- the xla form


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


def xla_attention(q, k, v, *, config: AttentionConfig | None = None):
    """q [..., Lq, H, D], k/v [..., Lk, H, D] → [..., Lq, H, D]; softmax(q·kᵀ/√D)·v.

    The forward pass is op for op `jax.nn.dot_product_attention`'s XLA implementation: logits in
    float32, scaled by 1/√D, softmax in float32, cast to k's dtype, weighted sum of v. It is
    written out so that the softmax uses the closed-form derivative above and the einsums carry no
    vmap over head groups, whose transposed layouts and exp/sum/division backward cost ~7 % of a
    CPU training step.
    """
    del config
    if q.dtype == jnp.bfloat16:
        precision = jax.lax.DotAlgorithmPreset.BF16_BF16_F32
    elif q.dtype == jnp.float16:
        precision = jax.lax.DotAlgorithmPreset.F16_F16_F32
    else:
        precision = None
    logits = jnp.einsum("...qhd,...khd->...hqk", q, k, precision=precision,
                        preferred_element_type=jnp.float32)
    logits = logits * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), logits.dtype)
    probs = softmax(logits.astype(jnp.float32)).astype(k.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", probs, v)


# ----------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Backend:
    run: Callable            # (q [N, Lq, H, D], k, v, *, config) → out
    unsupported: Callable    # (q, k, platform, config) → reason it cannot run, or None
    per_shard: bool = True   # run under shard_map when sharded (an opaque kernel XLA cannot split)


def _cudnn_unsupported(q, k, platform, config):
    if platform != "gpu":
        return f"cuDNN attention runs on GPU only (platform {platform!r})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16/float16 q/k/v, got {q.dtype}"
    d = q.shape[-1]
    if d > 128 or d % 8:
        return f"cuDNN flash attention needs a head dim ≤ 128 and a multiple of 8, got {d}"
    return None


def _splash_unsupported(q, k, platform, config):
    if platform != "tpu" and not config.interpret:
        return f"the splash kernel lowers through Mosaic on TPU only (platform {platform!r})"
    return None


BACKENDS: dict[str, Backend] = {
    "xla": Backend(xla_attention, lambda *_: None, per_shard=False),
    "chunked": Backend(lambda q, k, v, config: chunked_attention(q, k, v, chunk_size=config.chunk_size),
                       lambda *_: None),
    "cudnn": Backend(lambda q, k, v, config: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
                     _cudnn_unsupported),
    "splash": Backend(lambda q, k, v, config: splash_attention(q, k, v, interpret=config.interpret),
                      _splash_unsupported),
}
AUTO_ORDER = {"cpu": ("xla",), "gpu": ("cudnn", "chunked"), "tpu": ("splash", "chunked")}


def select_backend(config: AttentionConfig, q, k, platform: str) -> str:
    """The backend name for one call (see the module docstring for the rules)."""
    if min(q.shape[-3], k.shape[-3]) < config.min_seq_length:
        return "xla"
    if config.backend != "auto":
        reason = BACKENDS[config.backend].unsupported(q, k, platform, config)
        if reason:
            raise ValueError(f"attention backend {config.backend!r} cannot run q {tuple(q.shape)} "
                             f"{q.dtype}: {reason}; use 'auto' or 'chunked'")
        return config.backend
    return next(name for name in AUTO_ORDER.get(platform, ("chunked",))
                if BACKENDS[name].unsupported(q, k, platform, config) is None)


DEFAULT = AttentionConfig()


def dot_product_attention(q, k, v, config: AttentionConfig = DEFAULT,
                          names: Sequence[str | None] | None = None):
    """softmax(q·kᵀ/√D)·v with q [..., Lq, H, D], k/v [..., Lk, H, D] (same leading dims).

    `names`: logical names of q's leading and length dims (e.g. ("act_batch", "act_tokens")), used
    to lay out the fused kernels' per-device blocks under an activation-sharding context.
    """
    name = select_backend(config, q, k, act.platform())
    backend = BACKENDS[name]
    if not backend.per_shard:
        return backend.run(q, k, v, config=config)
    lead = q.shape[:-3]
    flat = lambda t: t.reshape(-1, *t.shape[-3:])
    out = _per_shard(functools.partial(backend.run, config=config), flat(q), flat(k), flat(v), names)
    return out.reshape(*lead, *out.shape[1:])


def _per_shard(run, q, k, v, names):
    """run(q, k, v) on each device's block under shard_map: batch and heads split by the rules,
    queries split along the length as `names` say, keys/values whole (gathered) on every device."""
    ctx = act.current()
    if ctx is None or names is None:
        return run(q, k, v)
    batch_name, length_name = names[0], names[-1]   # leading dims are folded into the first
    q_spec = ctx.spec(q.shape, (batch_name, length_name, "act_heads", None))
    kv_spec = ctx.spec(k.shape, (batch_name, None, "act_heads", None))
    return jax.shard_map(run, mesh=ctx.mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)
