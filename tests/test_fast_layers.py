"""The CPU-speed rewrites in models/layers.py and models/attention.py against the plain JAX forms
they replace: same values and same gradients (a rewrite that only changes the lowering must not
change what is differentiated)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from keyface_jax.models.attention import GEGLU, gelu
from keyface_jax.models.attention_backends import dot_product_attention, softmax
from keyface_jax.models.layers import Conv, dense

TOL = dict(rtol=1e-5, atol=1e-6)


def _normal(seed, *shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _assert_trees_close(a, b, rtol=1e-5):
    """Leafwise, to `rtol` of each leaf's largest magnitude: gradients are sums whose order the
    rewrites change, so small entries next to large ones differ by float rounding only."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=rtol * np.abs(y).max())


# ----------------------------------------------------------------------------- softmax


def test_softmax_values_match_jax_nn():
    x = _normal(0, 3, 5, 17, scale=4.0)
    np.testing.assert_allclose(softmax(x), jax.nn.softmax(x, axis=-1), **TOL)
    # Large logits: the max shift keeps it finite, as in jax.nn.softmax.
    big = x * 1e3
    assert np.isfinite(np.asarray(softmax(big))).all()
    np.testing.assert_allclose(softmax(big), jax.nn.softmax(big, axis=-1), **TOL)


def test_softmax_custom_jvp_matches_autodiff():
    x, w = _normal(1, 4, 9, 13, scale=3.0), _normal(2, 4, 9, 13)
    loss = lambda f: (lambda x: jnp.sum(w * f(x) ** 2))
    ours = jax.grad(loss(softmax))(x)
    ref = jax.grad(loss(lambda x: jax.nn.softmax(x, axis=-1)))(x)
    np.testing.assert_allclose(ours, ref, **TOL)
    # Forward mode and the Jacobian itself (the jvp rule is what both directions use).
    t = _normal(3, 4, 9, 13)
    _, jvp_ours = jax.jvp(softmax, (x,), (t,))
    _, jvp_ref = jax.jvp(lambda x: jax.nn.softmax(x, axis=-1), (x,), (t,))
    np.testing.assert_allclose(jvp_ours, jvp_ref, **TOL)
    v = _normal(4, 6)
    np.testing.assert_allclose(jax.jacfwd(softmax)(v), jax.jacrev(jax.nn.softmax)(v), **TOL)


def test_softmax_second_derivative_matches():
    # The jvp rule is itself differentiable (it is written with jnp ops), so Hessian-vector
    # products work as they do through jax.nn.softmax.
    x, w = _normal(5, 7), _normal(6, 7)
    f = lambda s: (lambda x: jnp.sum(w * s(x) ** 3))
    np.testing.assert_allclose(jax.hessian(f(softmax))(x), jax.hessian(f(jax.nn.softmax))(x),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("lq,lk", [(16, 16), (12, 5)])
def test_attention_matches_jax_nn_values_and_grads(lq, lk):
    q, k, v = _normal(7, 2, lq, 3, 8), _normal(8, 2, lk, 3, 8), _normal(9, 2, lk, 3, 8)
    np.testing.assert_allclose(dot_product_attention(q, k, v),
                               jax.nn.dot_product_attention(q, k, v), **TOL)
    w = _normal(10, 2, lq, 3, 8)
    loss = lambda f: (lambda q, k, v: jnp.sum(w * f(q, k, v)))
    _assert_trees_close(jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v),
                        jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v))


def test_attention_bf16_close_to_jax_nn():
    q, k, v = (t.astype(jnp.bfloat16) for t in (_normal(11, 2, 10, 2, 16), _normal(12, 2, 6, 2, 16),
                                                 _normal(13, 2, 6, 2, 16)))
    ours = dot_product_attention(q, k, v)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32),
                               np.asarray(jax.nn.dot_product_attention(q, k, v), np.float32),
                               rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- dense / GEGLU


def test_dense_matches_nd_dot_values_and_grads():
    x, kernel, bias = _normal(14, 2, 3, 5, 6), _normal(15, 6, 4), _normal(16, 4)
    ref = lambda x, k, b: jnp.dot(x, k) + b
    np.testing.assert_allclose(dense(x, kernel, bias), ref(x, kernel, bias), **TOL)
    np.testing.assert_allclose(dense(x, kernel), jnp.dot(x, kernel), **TOL)
    w = _normal(17, 2, 3, 5, 4)
    loss = lambda f: (lambda *a: jnp.sum(w * f(*a)))
    _assert_trees_close(jax.grad(loss(dense), argnums=(0, 1, 2))(x, kernel, bias),
                        jax.grad(loss(ref), argnums=(0, 1, 2))(x, kernel, bias))


def test_gelu_matches_exact_jax_gelu():
    x = jnp.linspace(-8.0, 8.0, 1001)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x),
                               jax.vmap(jax.grad(lambda x: jax.nn.gelu(x, approximate=False)))(x),
                               rtol=1e-5, atol=1e-6)


def test_geglu_matches_split_projection():
    layer = GEGLU(6, 5, rngs=nnx.Rngs(0))
    layer.proj.bias[...] = _normal(18, 10)
    graphdef, state = nnx.split(layer)
    x = _normal(19, 2, 7, 6)

    def reference(state, x):  # proj(x), split in halves, hidden · GELU(gate)
        hidden, gate = jnp.split(x @ state["proj"]["kernel"][...] + state["proj"]["bias"][...], 2, -1)
        return hidden * jax.nn.gelu(gate, approximate=False)

    ours = lambda state, x: nnx.merge(graphdef, state)(x)
    np.testing.assert_allclose(ours(state, x), reference(state, x), **TOL)
    w = _normal(20, 2, 7, 5)
    loss = lambda f: (lambda *a: jnp.sum(w * f(*a)))
    _assert_trees_close(jax.grad(loss(ours), argnums=(0, 1))(state, x),
                        jax.grad(loss(reference), argnums=(0, 1))(state, x))


# ----------------------------------------------------------------------------- temporal conv


def _conv3d(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), [(p, p) for p in padding],
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


@pytest.mark.parametrize("k,pad", [(3, 1), (3, 0), (1, 0), (5, 2)])
def test_temporal_conv_as_2d_matches_3d_conv(k, pad):
    conv = Conv(4, 6, (k, 1, 1), padding=(pad, 0, 0), rngs=nnx.Rngs(0))
    assert conv._is_temporal_only()
    conv.bias[...] = _normal(21, 6)
    x = _normal(22, 2, 7, 3, 5, 4)
    graphdef, state = nnx.split(conv)
    reference = lambda state, x: (_conv3d(x, state["kernel"][...], (pad, 0, 0))
                                  + state["bias"][...])
    ours = lambda state, x: nnx.merge(graphdef, state)(x)

    out = ours(state, x)
    assert out.shape == (2, 7 - k + 1 + 2 * pad, 3, 5, 6)
    np.testing.assert_allclose(out, reference(state, x), **TOL)
    w = _normal(23, *out.shape)
    loss = lambda f: (lambda *a: jnp.sum(w * f(*a)))
    _assert_trees_close(jax.grad(loss(ours), argnums=(0, 1))(state, x),
                        jax.grad(loss(reference), argnums=(0, 1))(state, x))


def test_other_convs_keep_the_general_path():
    # Spatial padding or a spatial window or strides: not the (k, 1, 1) fast path.
    assert not Conv(4, 4, (3, 3, 3), rngs=nnx.Rngs(0))._is_temporal_only()
    assert not Conv(4, 4, (3, 1, 1), padding=(1, 1, 0), rngs=nnx.Rngs(0))._is_temporal_only()
    assert not Conv(4, 4, (3, 1, 1), strides=(2, 1, 1), rngs=nnx.Rngs(0))._is_temporal_only()
    assert not Conv(4, 4, (3, 3), rngs=nnx.Rngs(0))._is_temporal_only()
