"""KeyFace networks: condition routing (spec §2.2-2.4), dropout semantics, frames, dtype, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from keyface_jax.models.keyface import EMOTION_EMBED_DIM, KeyFaceConfig
from keyface_jax.models.layers import timestep_embedding
from tests.helpers import call, call_unet, network_inputs, tiny_config, tiny_network


def _unet_input_keyframe(net, inp, audio_keep=None, identity_keep=None):
    """The UNet inputs re-derived by hand from spec §2.2-2.4, to check the wrapper's routing."""
    proj = net.audio_proj
    ctx = inp["audio"].mean(axis=2) @ proj.kernel[...] + proj.bias[...]
    if audio_keep is not None:
        ctx = ctx * audio_keep[:, None, None]
    ident = inp["identity"] if identity_keep is None else inp["identity"] * identity_keep[:, None, None, None]
    x = jnp.concatenate([inp["x"], jnp.broadcast_to(ident[:, None], inp["x"].shape)], -1)
    y = jnp.concatenate([timestep_embedding(inp["valence"], EMOTION_EMBED_DIM),
                         timestep_embedding(inp["arousal"], EMOTION_EMBED_DIM), ctx], -1)
    return x, ctx, y


def test_keyframe_routing_matches_spec():
    net, config = tiny_network("keyframe")
    inp = network_inputs(config)
    keep_audio, keep_ident = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    out = call(net, inp, audio_keep=keep_audio, identity_keep=keep_ident)
    x, ctx, y = _unet_input_keyframe(net, inp, keep_audio, keep_ident)
    assert y.shape[-1] == 2 * EMOTION_EMBED_DIM + config.unet.context_dim
    expect = call_unet(net.diffusion_model, x, inp["c_noise"], ctx, y)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    # Dropping audio zeroes the projection *output* (bias included), not its input.
    zero_audio = dict(inp, audio=jnp.zeros_like(inp["audio"]))
    differs = np.abs(np.asarray(call(net, zero_audio)[1] - out[1])).max()
    assert differs > 1e-4, "zero audio input still goes through the projection bias"


def test_emotion_changes_output_and_is_never_dropped():
    net, config = tiny_network("keyframe")
    inp = network_inputs(config)
    base = call(net, inp, audio_keep=jnp.zeros(2), identity_keep=jnp.zeros(2))
    moved = call(net, dict(inp, valence=inp["valence"] + 0.5), audio_keep=jnp.zeros(2),
                 identity_keep=jnp.zeros(2))
    assert np.abs(np.asarray(base - moved)).max() > 1e-4


def test_interpolation_condition_sequence():
    net, config = tiny_network("interpolation")
    inp = network_inputs(config, frames=5)
    out = call(net, inp, cond_keep=jnp.array([1.0, 0.0]))
    b, t, h, w, c = inp["x"].shape
    first = inp["first"] * jnp.array([1.0, 0.0])[:, None, None, None]
    last = inp["last"] * jnp.array([1.0, 0.0])[:, None, None, None]
    middle = jnp.broadcast_to(net.learned_mask[...], (b, t - 2, h, w, c))
    cond = jnp.concatenate([first[:, None], middle, last[:, None]], 1)
    mask = jnp.zeros((b, t, h, w, 1)).at[:, 0].set(1).at[:, -1].set(1)
    proj = net.audio_proj
    ctx = inp["audio"].mean(axis=2) @ proj.kernel[...] + proj.bias[...]
    expect = call_unet(net.diffusion_model, jnp.concatenate([inp["x"], cond, mask], -1), inp["c_noise"],
                      ctx, ctx)
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frames", [1, 3, 14])
def test_any_number_of_frames(frames):
    net, config = tiny_network("keyframe")
    out = call(net, network_inputs(config, batch=1, frames=frames))
    assert out.shape == (1, frames, config.latent_size, config.latent_size, 4)
    assert np.isfinite(np.asarray(out)).all()


def test_bf16_compute_close_to_fp32():
    net32, config = tiny_network("keyframe")
    net16, _ = tiny_network("keyframe", dtype=jnp.bfloat16)
    nnx.update(net16, nnx.state(net32, nnx.Param))
    inp = network_inputs(config)
    ref, low = call(net32, inp), call(net16, inp)
    assert low.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(net16, nnx.Param)))
    rel = np.abs(np.asarray(low, np.float32) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
    assert rel < 5e-2, rel


def test_remat_gives_the_same_gradients():
    # One level keeps the two gradient compilations short on CPU.
    config = tiny_config("interpolation", unet=dict(
        tiny_config("interpolation").unet.__dict__, block_out_channels=(32,), layers_per_block=(1,),
        down_attention=(True,), up_attention=(True,), num_heads=(1,), transformer_depth=(1,),
        mid_num_heads=1, down_resnet_eps=(1e-5,), up_resnet_eps=(1e-5,)))
    net, config = tiny_network("interpolation", config=config)
    inp = network_inputs(config, batch=1, frames=3)
    remat_cfg = KeyFaceConfig(**{**config.__dict__, "unet": config.unet.__class__(
        **{**config.unet.__dict__, "remat": True, "remat_policy": "dots_saveable"})})
    graphdef, state = nnx.split(net)

    def loss(state, cfg):
        model = nnx.merge(graphdef, state)
        model.diffusion_model.config = cfg.unet
        return jnp.mean(jnp.square(call(model, inp)))

    g_plain = jax.jit(jax.grad(loss), static_argnums=1)(state, config)
    g_remat = jax.jit(jax.grad(loss), static_argnums=1)(state, remat_cfg)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_config_errors_are_clear():
    config = tiny_config("keyframe")
    with pytest.raises(ValueError, match="in_channels=8"):
        KeyFaceConfig(kind="keyframe", unet=config.unet.__class__(**{**config.unet.__dict__, "in_channels": 9}))
    with pytest.raises(ValueError, match="not a multiple of 32"):
        config.unet.__class__(**{**config.unet.__dict__, "block_out_channels": (48, 64)})
    with pytest.raises(ValueError, match="kind"):
        KeyFaceConfig(kind="video", unet=config.unet)
