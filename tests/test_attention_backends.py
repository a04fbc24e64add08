"""Attention backends against the reference (`xla`) form: values and gradients of every backend
that runs here (`chunked` on CPU, `splash` in Pallas interpret mode), memory that grows linearly
in tokens, the selection rules, and the networks' diffusers parity with each backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keyface_jax.models.attention_backends import (AttentionConfig, dot_product_attention,
                                                   select_backend, xla_attention)
from keyface_jax.models.chunked_attention import chunked_attention
from keyface_jax.models.splash_attention import splash_attention

# (leading dims, Lq, Lk, heads, head dim): self-attention over padded blocks with extra leading
# dims (the temporal layout), cross-attention to a short context, a lane-wide head dim.
SHAPES = [((2, 3), 37, 37, 2, 8), ((3,), 20, 7, 1, 16), ((1,), 130, 5, 1, 128)]


def _qkv(seed, lead, lq, lk, h, d, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    return f(*lead, lq, h, d), f(*lead, lk, h, d), f(*lead, lk, h, d), f(*lead, lq, h, d)


def _assert_values_and_grads(fn, shape, rtol=2e-5):
    q, k, v, w = _qkv(sum(shape[1:3]), *shape)
    loss = lambda f: (lambda q, k, v: jnp.sum(w * f(q, k, v)))
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), xla_attention(q, k, v), rtol=rtol, atol=rtol)
    ours = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_chunked_matches_reference_values_and_grads(shape):
    _assert_values_and_grads(lambda q, k, v: chunked_attention(q, k, v, chunk_size=8), shape)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]])
def test_splash_interpreted_matches_reference_values_and_grads(shape):
    def splash(q, k, v):
        flat = lambda t: t.reshape(-1, *t.shape[-3:])
        return splash_attention(flat(q), flat(k), flat(v), interpret=True).reshape(q.shape)
    _assert_values_and_grads(splash, shape)


def test_bf16_backends_close_to_reference():
    q, k, v, _ = _qkv(3, (2,), 40, 40, 2, 16, jnp.bfloat16)
    ref = np.asarray(xla_attention(q, k, v), np.float32)
    for out in (chunked_attention(q, k, v, chunk_size=16), splash_attention(q, k, v, interpret=True)):
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=3e-2, atol=3e-2)


def _largest_intermediate(fn, *args) -> int:
    """Elements of the largest array any equation of fn's jaxpr (scan bodies included) makes."""
    def walk(jaxpr):
        sizes = [int(np.prod(v.aval.shape)) for e in jaxpr.eqns for v in e.outvars
                 if hasattr(v.aval, "shape")]
        for e in jaxpr.eqns:
            for p in e.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        sizes.append(walk(inner))
        return max(sizes, default=0)
    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_chunked_memory_grows_linearly_in_tokens():
    def grad_fn(attention):
        return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) ** 2), argnums=(0, 1, 2))

    chunked = lambda q, k, v: chunked_attention(q, k, v, chunk_size=64)
    sizes = {}
    for length in (512, 1024):
        q, k, v, _ = _qkv(0, (1,), length, length, 2, 8)
        sizes[length] = (_largest_intermediate(grad_fn(chunked), q, k, v),
                         _largest_intermediate(grad_fn(xla_attention), q, k, v))
    (c1, x1), (c2, x2) = sizes[512], sizes[1024]
    assert x2 == 4 * x1 and x1 == 2 * 512 * 512          # reference: [N, H, L, L] logits
    assert c2 <= 2 * c1 and c2 < 2 * 1024 * 1024 // 8   # chunked: linear, far below the logits


def test_selection_rules():
    q32 = jax.ShapeDtypeStruct((2, 4096, 5, 64), jnp.float32)
    q16 = jax.ShapeDtypeStruct((2, 4096, 5, 64), jnp.bfloat16)
    wide = jax.ShapeDtypeStruct((2, 4096, 1, 512), jnp.bfloat16)
    short = jax.ShapeDtypeStruct((2, 14, 5, 64), jnp.bfloat16)
    auto = AttentionConfig()
    assert select_backend(auto, q32, q32, "cpu") == "xla"        # CPU keeps the tuned form
    assert select_backend(auto, q16, q16, "gpu") == "cudnn"
    assert select_backend(auto, q32, q32, "gpu") == "chunked"    # cuDNN flash: bf16/fp16 only
    assert select_backend(auto, wide, wide, "gpu") == "chunked"  # head dim 512 (the VAE)
    assert select_backend(auto, q32, q32, "tpu") == "splash"
    assert select_backend(auto, q16, short, "tpu") == "xla"      # 14 keys < min_seq_length
    assert select_backend(AttentionConfig("chunked"), q32, q32, "cpu") == "chunked"
    assert select_backend(AttentionConfig("chunked"), short, short, "cpu") == "xla"
    assert select_backend(AttentionConfig("splash", interpret=True), q32, q32, "cpu") == "splash"
    with pytest.raises(ValueError, match="'cudnn' cannot run .* GPU only"):
        select_backend(AttentionConfig("cudnn"), q16, q16, "cpu")
    with pytest.raises(ValueError, match="'cudnn' cannot run .* bfloat16/float16"):
        select_backend(AttentionConfig("cudnn"), q32, q32, "gpu")
    with pytest.raises(ValueError, match="'splash' cannot run .* Mosaic on TPU only"):
        select_backend(AttentionConfig("splash"), q32, q32, "cpu")
    with pytest.raises(ValueError, match="attention backend 'flash'"):
        AttentionConfig("flash")


def test_dispatch_runs_the_selected_backend():
    q, k, v, _ = _qkv(5, (2,), 24, 24, 2, 8)
    ref = xla_attention(q, k, v)
    for config in (AttentionConfig("chunked", min_seq_length=0, chunk_size=5),
                   AttentionConfig("splash", min_seq_length=0, interpret=True)):
        np.testing.assert_allclose(dot_product_attention(q, k, v, config), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["chunked", "splash"])
def test_fused_backends_per_device_under_sharding(backend):
    """Under an activation-sharding context the fused backends run per device (shard_map): batch
    over fsdp, heads over tensor, queries over context, keys gathered; same values and gradients."""
    from keyface_jax.activation_sharding import activation_sharding
    from keyface_jax.sharding import make_mesh

    q, k, v, w = _qkv(6, (2,), 16, 16, 2, 8)
    config = AttentionConfig(backend, min_seq_length=0, chunk_size=4, interpret=True)
    loss = lambda q, k, v: jnp.sum(w * dot_product_attention(q, k, v, config, ("act_batch", "act_tokens")))
    expected = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for shape in ({"context": 2, "tensor": 2}, {"fsdp": 2, "context": 2}):
        with activation_sharding(make_mesh(shape)):
            lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v)
            got = lowered.compile()(q, k, v)
        assert "shard_map" in lowered.as_text() or "manual" in lowered.as_text()
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(np.abs(b).max()))


# ----------------------------------------------------------------------------- network parity


# The spatial self-attention of the networks (25 and 9 tokens; the autoencoder's 20) on the
# backend, in blocks of 8; the 3-4 frame temporal and 3-token cross attention below
# min_seq_length take the xla form, as at full size (the unit tests above cover those shapes).
NETWORK_BACKENDS = {name: AttentionConfig(name, min_seq_length=9, chunk_size=8, interpret=True)
                    for name in ("chunked", "splash")}


def test_unet_matches_diffusers_with_each_backend():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from keyface_jax.testing.unet_parity import unet_errors_by_attention
    from tests.test_unet_parity import CONFIGS
    errors = unet_errors_by_attention(CONFIGS["svd_like"], 0, NETWORK_BACKENDS)
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("backend", sorted(NETWORK_BACKENDS))
def test_autoencoder_matches_diffusers_with_each_backend(backend):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from keyface_jax.testing.vae_parity import check_vae_against_diffusers
    from tests.test_autoencoder import CONFIGS
    err = check_vae_against_diffusers(CONFIGS[2], seed=2, attention=NETWORK_BACKENDS[backend])
    assert err <= 1e-5, err
