"""Named remat policies: what each keeps for the backward pass of a (small) VideoUNet, and the
config resolution of `remat` / `remat_policy`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

from configs import keyframe
from keyface_jax.config_lib import network_config
from keyface_jax.models.attention_backends import AttentionConfig
from keyface_jax.models.remat import REMAT_POLICIES, remat_policy
from keyface_jax.models.transformer import SpatialVideoTransformer
from keyface_jax.models.unet import UNetConfig, VideoUNet

ONE_LEVEL = UNetConfig(in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=(1,),
                       down_attention=(True,), up_attention=(True,), num_heads=(2,),
                       transformer_depth=(1,), mid_transformer_depth=1, mid_num_heads=2,
                       context_dim=16, down_resnet_eps=(1e-5,), up_resnet_eps=(1e-5,))


def _residuals(policy: str, backend: str):
    """(elements kept for the backward pass, names of the named ones) of a one-level UNet on 8×8
    latents, its 64-token spatial attention on `backend`."""
    cfg = dataclasses.replace(ONE_LEVEL, remat=policy != "none", remat_policy=policy,
                              attention=AttentionConfig(backend, min_seq_length=16, chunk_size=16))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoUNet(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    x, c_noise, context = jnp.ones((1, 2, 8, 8, 4)), jnp.ones((1,)), jnp.ones((1, 2, 16))
    loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x, c_noise, context))
    kept = [(aval, what) for aval, what in saved_residuals(loss, state, x) if "argument" not in what]
    names = {what.split("'")[1] for _, what in kept if what.startswith("named")}
    return sum(int(np.prod(aval.shape)) for aval, _ in kept), names


def test_policies_keep_what_they_name():
    kept = {policy: _residuals(policy, "chunked") for policy in REMAT_POLICIES}
    sizes = {policy: size for policy, (size, _) in kept.items()}
    # block inputs only < + attention outputs < + every projection's output < everything
    assert sizes["block"] < sizes["block_save_attention"] < sizes["block_save_dots"] < sizes["none"]
    assert sizes["block"] < sizes["none"] / 20
    assert kept["block"][1] == kept["block_save_dots"][1] == set()
    # the output and, inside the chunked form's custom VJP, its log-sum-exp: no attention re-run
    assert kept["block_save_attention"][1] == {"attention_out", "attention_lse"}


def test_policy_resolution_and_config_defaults():
    assert remat_policy(False, "block") == (False, REMAT_POLICIES["block"])
    assert remat_policy(True, None) == (True, REMAT_POLICIES["block"])
    assert remat_policy(True, "none")[0] is False
    assert remat_policy(True, "dots_saveable") == (True, jax.checkpoint_policies.dots_saveable)
    with pytest.raises(ValueError, match="remat_policy 'blocks': choose one of"):
        remat_policy(True, "blocks")
    full = network_config(keyframe.get_config("full").model).unet
    tiny = network_config(keyframe.get_config("tiny").model).unet
    assert (full.remat, full.remat_policy) == (True, "block")
    assert keyframe.get_config("full").model.dtype == "bfloat16"
    assert keyframe.get_config("full").model.param_dtype == "float32"
    assert remat_policy(tiny.remat, tiny.remat_policy)[0] is False


def _wide_feed_forward_residuals(remat_feed_forward: bool):
    """Shapes of the activations a video transformer (32 channels, 8×8 tokens, 2 frames) keeps for
    its backward pass that are as wide as a feed-forward's inner layer (4 × 32)."""
    module = SpatialVideoTransformer(32, 2, 1, 16, rngs=nnx.Rngs(0), remat_feed_forward=remat_feed_forward)
    graphdef, state = nnx.split(module)
    x, context = jnp.ones((1, 2, 8, 8, 32)), jnp.ones((1, 2, 16))
    loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x, context))
    return {aval.shape for aval, what in saved_residuals(loss, state, x)
            if "argument" not in what and aval.shape[-1:] == (128,) and 64 in aval.shape}


def test_block_ffn_keeps_no_feed_forward_intermediates():
    """Inside a block's recomputation (`block_ffn`), each feed-forward keeps only its input: its
    GEGLU's 4×-wide halves are recomputed in its own backward instead of being held beside the
    rest of the block's activations."""
    assert _wide_feed_forward_residuals(False)   # spatial [B, T, L, 4C] and temporal [B, L, T, 4C]
    assert not _wide_feed_forward_residuals(True)


@pytest.mark.parametrize("policy", ["block", "block_ffn"])
def test_remat_policies_equal_no_remat(policy):
    """Values and parameter gradients of a remat policy equal those without remat (parameters
    perturbed, so that the zero-initialised output layers pass gradients to every block)."""
    results = {}
    for name in ("none", policy):
        cfg = dataclasses.replace(ONE_LEVEL, remat=name != "none", remat_policy=name)
        graphdef, state = nnx.split(VideoUNet(cfg, rngs=nnx.Rngs(0)))
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(3), len(leaves))
        state = jax.tree.unflatten(treedef, [a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
                                             for a, k in zip(leaves, keys)])
        x = jax.random.normal(jax.random.key(1), (1, 2, 8, 8, 4))
        c_noise, context = jnp.ones((1,)), jax.random.normal(jax.random.key(2), (1, 2, 16))
        loss = lambda state: jnp.mean(jnp.square(nnx.merge(graphdef, state)(x, c_noise, context)))
        results[name] = jax.jit(jax.value_and_grad(loss))(state)
    np.testing.assert_allclose(results[policy][0], results["none"][0], rtol=1e-6)
    grads = [jax.tree.leaves(results[name][1]) for name in ("none", policy)]
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(np.abs(a).max() > 0 for a in grads[0])   # every parameter takes part
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_remat_with_frozen_parameters_trains_like_no_remat():
    """The trainer differentiates the trainable parameters only, the frozen ones merged in beside
    them (the `reference` preset of the `full` configs freezes the temporal layers). Under remat
    the block's state crosses jax.checkpoint as arguments; the gradients equal those without."""
    grads = {}
    for policy in ("none", "block"):
        cfg = dataclasses.replace(ONE_LEVEL, remat=policy != "none", remat_policy=policy)
        model = VideoUNet(cfg, rngs=nnx.Rngs(0))
        frozen_filter = nnx.All(nnx.Param, nnx.PathContains("time_stack"))
        graphdef, frozen, trainable = nnx.split(model, frozen_filter, nnx.Param)
        x, c_noise, context = jnp.ones((1, 2, 8, 8, 4)), jnp.ones((1,)), jnp.ones((1, 2, 16))

        def loss(trainable, frozen):
            return jnp.mean(jnp.square(nnx.merge(graphdef, frozen, trainable)(x, c_noise, context)))

        assert jax.tree.leaves(frozen) and jax.tree.leaves(trainable)
        grads[policy] = jax.jit(jax.grad(loss))(trainable, frozen)
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["block"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
