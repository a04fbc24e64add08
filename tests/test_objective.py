"""Training objective (spec §4): closed forms, weighting, CFG dropout, pixel losses, §9.10 fix."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import interpolation, keyframe
from keyface_jax.diffusion.objective import (ObjectiveConfig, add_noise, box_mask,
                                             check_objective_inputs, diffusion_l2,
                                             draw_randomness, keyface_loss, loss_weight,
                                             lpips_for_objective, row_weights, spatial_weights)
from keyface_jax.diffusion.scalings import vscaling
from keyface_jax.losses.lpips import LPIPS
from keyface_jax.models.autoencoder import SCALE_FACTOR, VAEConfig, VideoDecoder
from keyface_jax.models.keyface import InterpolationNet, KeyframeNet
from tests.helpers import random_state, tiny_network

B, T, LAT, AUDIO = 2, 3, 8, 32  # latents 8×8 → 16×16 frames through a 2-level decoder


def _batch(kind="keyframe", seed=0, audio_dim=AUDIO):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    batch = dict(latents=f(B, T, LAT, LAT, 4), audio=f(B, T, 2, audio_dim))
    if kind == "keyframe":
        batch.update(valence=jnp.tanh(f(B, T)), arousal=jnp.tanh(f(B, T)))
    return batch


def _filled(abstract, seed):
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, random_state(state, seed))


@pytest.fixture(scope="module")
def decoder():
    cfg = VAEConfig(block_out_channels=(32, 32), layers_per_block=1)
    return _filled(nnx.eval_shape(lambda: VideoDecoder(cfg, rngs=nnx.Rngs(0))), seed=3)


@pytest.fixture(scope="module")
def lpips():
    return _filled(nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0))), seed=4)


# ----------------------------------------------------------------------------- closed forms


def test_scalings_and_noising_closed_form():
    sigma = np.array([0.002, 0.3, 1.0, 2.7, 700.0])
    c_skip, c_out, c_in, c_noise = (np.asarray(c, np.float64) for c in vscaling(jnp.asarray(sigma)))
    np.testing.assert_allclose(c_skip, 1 / (sigma**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_out, -sigma / np.sqrt(sigma**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_noise, 0.25 * np.log(sigma), rtol=1e-6, atol=1e-7)
    # One σ per clip, shared by its frames: x_σ = x0 + σ·ε.
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 2, 3, 4, 4, 4))
    s = np.array([0.5, 3.0])
    got = add_noise(jnp.asarray(x0), jnp.asarray(s), jnp.asarray(eps))
    np.testing.assert_allclose(got, x0 + s[:, None, None, None, None] * eps, rtol=1e-6, atol=1e-6)


def test_sigma_distribution_is_configurable():
    for p_mean, p_std in ((1.0, 1.2), (0.7, 1.6)):
        cfg = ObjectiveConfig(p_mean=p_mean, p_std=p_std)
        sigma = np.asarray(draw_randomness(jax.random.key(0), (20000, 1, 1, 1, 1), cfg)["sigma"])
        assert abs(np.log(sigma).mean() - p_mean) < 0.04
        assert abs(np.log(sigma).std() - p_std) < 0.04


def test_loss_weight():
    sigma = jnp.array([0.5, 1.0, 2.0, 10.0])
    np.testing.assert_allclose(loss_weight(sigma), [5.0, 2.0, 1.25, 1.01], rtol=1e-6)


def test_row_weighting_hand_built():
    np.testing.assert_array_equal(row_weights(4, 3.0), [1, 1, 3, 3])
    np.testing.assert_array_equal(row_weights(5, 2.0), [1, 1, 2, 2, 2])  # rows h//2 .. h−1
    # Errors (pred − target) of 1, 2, 3, 4 on rows 0..3, the same over w and c.
    err = jnp.broadcast_to(jnp.arange(1.0, 5.0)[None, None, :, None, None], (2, 1, 4, 2, 3))
    sigma = jnp.array([1.0, 2.0])                       # λ = 2 and 1.25
    got = diffusion_l2(err, jnp.zeros_like(err), sigma, lambda_lower=3.0)
    # mean over rows of [1·1, 1·4, 3·9, 3·16] = 80/4 = 20; times λ.
    np.testing.assert_allclose(got, [[40.0], [25.0]], rtol=1e-6)
    got = diffusion_l2(err, jnp.zeros_like(err), sigma, lambda_lower=2.0)  # interpolation
    np.testing.assert_allclose(got, [[2 * 55 / 4], [1.25 * 55 / 4]], rtol=1e-6)


def test_mouth_box_weighting_hand_built():
    box = (0.5, 0.75, 0.25, 0.75)                      # rows 2..2, cols 1..2 of a 4×4 grid
    inside = np.asarray(box_mask(4, 4, box))
    assert inside.sum() == 2 and inside[2, 1] and inside[2, 2]
    assert not np.asarray(box_mask(4, 4, ())).any()
    weights = np.asarray(spatial_weights(4, 4, 3.0, box, 5.0))
    np.testing.assert_array_equal(weights[:, 0], [1, 1, 3, 3])
    np.testing.assert_array_equal(weights[2], [3, 15, 15, 3])    # lower half × mouth
    np.testing.assert_array_equal(spatial_weights(4, 4, 3.0), row_weights(4, 3.0)[:, None] * np.ones(4))
    # a unit error on one cell inside the box and one outside, both in the lower half
    err = np.zeros((1, 1, 4, 4, 1), np.float32)
    err[0, 0, 2, 1] = err[0, 0, 3, 0] = 1.0
    got = diffusion_l2(jnp.asarray(err), jnp.zeros_like(err), jnp.array([1.0]), 3.0, box, 5.0)
    np.testing.assert_allclose(got, [[2.0 * (15 + 3) / 16]], rtol=1e-6)          # λ(1) = 2


def test_mouth_box_reaches_the_loss_and_bad_boxes_are_refused():
    cfg = ObjectiveConfig.for_kind("interpolation", mouth_box=[0.5, 0.9, 0.2, 0.8], lambda_mouth=4)
    assert cfg.mouth_box == (0.5, 0.9, 0.2, 0.8)
    for bad in ((0.9, 0.5, 0.2, 0.8), (0.5, 0.9, 0.2), (0.5, 1.2, 0.2, 0.8)):
        with pytest.raises(ValueError, match="mouth_box"):
            ObjectiveConfig.for_kind("interpolation", mouth_box=bad)
    with pytest.raises(ValueError, match="lambda_mouth"):
        ObjectiveConfig.for_kind("interpolation", lambda_mouth=0)
    # a box over the whole frame multiplies the training loss by exactly lambda_mouth
    batch = dict(latents=jax.random.normal(jax.random.key(0), (2, 3, 4, 4, 1)),
                 audio=jnp.zeros((2, 3, 2, 5)))
    zero_net = lambda x, c_noise, **conditions: jnp.zeros_like(x)
    loss = lambda **kw: float(keyface_loss(zero_net, batch, jax.random.key(1),
                                           ObjectiveConfig.for_kind("interpolation", **kw))[0])
    assert loss(mouth_box=(0, 1, 0, 1), lambda_mouth=4) == pytest.approx(4 * loss(), rel=1e-6)


# ----------------------------------------------------------------------------- dropout


def test_dropout_rates_and_stream_independence():
    shape = (40000, 1, 2, 2, 1)
    cfg = ObjectiveConfig.for_kind("keyframe")
    d = jax.tree.map(np.asarray, draw_randomness(jax.random.key(7), shape, cfg))
    cond, audio = d["cond_keep"], d["audio_keep"]
    assert set(np.unique(cond)) <= {0.0, 1.0} and set(np.unique(audio)) <= {0.0, 1.0}
    # Binomial standard errors are ≤ 0.0025 here; 0.01 is four of them.
    assert abs(cond.mean() - 0.9) < 0.01 and abs(audio.mean() - 0.8) < 0.01
    assert abs((cond * audio).mean() - 0.72) < 0.01                     # independent per sample
    noise = d["noise"].reshape(shape[0], -1)[:, 0]
    assert abs(np.corrcoef(cond, noise)[0, 1]) < 0.02
    assert abs(np.corrcoef(audio, np.log(d["sigma"]))[0, 1]) < 0.02
    # Separate streams: other dropout rates leave σ and ε untouched; another σ law leaves the masks.
    other = jax.tree.map(np.asarray, draw_randomness(
        jax.random.key(7), shape, ObjectiveConfig(cond_drop_rate=0.5, audio_drop_rate=0.0)))
    np.testing.assert_array_equal(other["sigma"], d["sigma"])
    np.testing.assert_array_equal(other["noise"], d["noise"])
    assert other["audio_keep"].min() == 1.0 and abs(other["cond_keep"].mean() - 0.5) < 0.01
    moved = jax.tree.map(np.asarray, draw_randomness(
        jax.random.key(7), shape, ObjectiveConfig(p_mean=-2.0, p_std=0.3)))
    np.testing.assert_array_equal(moved["cond_keep"], cond)
    np.testing.assert_array_equal(moved["audio_keep"], audio)


# ----------------------------------------------------------------------------- wiring


class _Recorder:
    """Stands in for a network; checks its keywords against the real class's signature."""

    def __init__(self, cls):
        self.params = set(inspect.signature(cls.__call__).parameters) - {"self", "x", "c_noise"}
        self.seen = None

    def __call__(self, x, c_noise, **cond):
        assert set(cond) <= self.params, set(cond) - self.params
        self.seen = dict(cond, x=x, c_noise=c_noise)
        return jnp.zeros_like(x)


@pytest.mark.parametrize("kind", ["keyframe", "interpolation"])
def test_network_inputs_follow_the_reference(kind):
    cfg = ObjectiveConfig.for_kind(kind, pixel_weight=0.0)
    batch, key = _batch(kind), jax.random.key(3)
    net = _Recorder(KeyframeNet if kind == "keyframe" else InterpolationNet)
    keyface_loss(net, batch, key, cfg)
    d, seen = draw_randomness(key, batch["latents"].shape, cfg), net.seen
    lat = batch["latents"]
    _, _, c_in, c_noise = vscaling(d["sigma"])
    np.testing.assert_allclose(seen["x"], c_in[:, None, None, None, None] * (lat + d["sigma"][
        :, None, None, None, None] * d["noise"]), rtol=1e-6)
    np.testing.assert_allclose(seen["c_noise"], c_noise, rtol=1e-6)
    np.testing.assert_array_equal(seen["audio_keep"], d["audio_keep"])
    np.testing.assert_array_equal(seen["audio"], batch["audio"])
    if kind == "keyframe":  # identity = the clip's own first latent, raw (spec §1.1, §2.2)
        np.testing.assert_allclose(seen["identity"], lat[:, 0] / SCALE_FACTOR, rtol=1e-6)
        np.testing.assert_array_equal(seen["identity_keep"], d["cond_keep"])
        np.testing.assert_array_equal(seen["valence"], batch["valence"])
    else:                   # boundaries = frames 0 and T−1, raw (spec §1.2)
        np.testing.assert_allclose(seen["first"], lat[:, 0] / SCALE_FACTOR, rtol=1e-6)
        np.testing.assert_allclose(seen["last"], lat[:, -1] / SCALE_FACTOR, rtol=1e-6)
        np.testing.assert_array_equal(seen["cond_keep"], d["cond_keep"])
    # An explicit (scaled) condition latent overrides the default.
    override = "identity" if kind == "keyframe" else "last"
    keyface_loss(net, dict(batch, **{override: lat[:, 1]}), key, cfg)
    np.testing.assert_allclose(net.seen[override], lat[:, 1] / SCALE_FACTOR, rtol=1e-6)


# ----------------------------------------------------------------------------- oracle denoiser


class _Oracle:
    """F such that D(x_σ; σ) = x0: F = (x0 − c_skip·x_σ)/c_out, recovering σ from c_noise."""

    def __init__(self, x0):
        self.x0 = x0

    def __call__(self, x_in, c_noise, **cond):
        scalings = vscaling(jnp.exp(4 * c_noise))
        c_skip, c_out, c_in, _ = (c[:, None, None, None, None] for c in scalings)
        return (self.x0 - c_skip * x_in / c_in) / c_out


PIXEL_CFG = ObjectiveConfig.for_kind("keyframe", p_mean=-0.5, p_std=1.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _oracle_loss(dec_graph, lp_graph, batch, key, dec_state, lp_state):
    return keyface_loss(_Oracle(batch["latents"]), batch, key, PIXEL_CFG,
                        decoder=nnx.merge(dec_graph, dec_state),
                        lpips=nnx.merge(lp_graph, lp_state))


def _oracle(batch, key, decoder, lpips):
    (dg, ds), (lg, ls) = nnx.split(decoder), nnx.split(lpips)
    return _oracle_loss(dg, lg, batch, key, ds, ls)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, z):
    return jnp.clip(nnx.merge(graphdef, state)(z / SCALE_FACTOR, num_frames=1), -1, 1)


def _decode_frames(decoder, latents):
    """Every frame of [B, T, h, w, c] decoded on its own → [B, T, H, W, 3]."""
    graphdef, state = nnx.split(decoder)
    flat = _decode(graphdef, state, latents.reshape(-1, *latents.shape[2:]))
    return flat.reshape(*latents.shape[:2], *flat.shape[1:])


def test_exact_denoiser_gives_zero_loss(decoder, lpips):
    batch = _batch()
    batch["frames"] = _decode_frames(decoder, batch["latents"])
    loss, metrics = _oracle(batch, jax.random.key(0), decoder, lpips)
    assert set(metrics) >= {"loss", "loss_diffusion", "loss_pixel_l2", "loss_pixel_lpips"}
    for name in ("loss", "loss_diffusion", "loss_pixel_l2", "loss_pixel_lpips"):
        assert abs(float(metrics[name])) < 1e-6, (name, metrics[name])
    for kind in ("keyframe", "interpolation"):  # no pixel terms: eager is cheap enough
        b = _batch(kind)
        loss, m = keyface_loss(_Oracle(b["latents"]), b, jax.random.key(1),
                               ObjectiveConfig.for_kind(kind, pixel_weight=0.0))
        assert abs(float(loss)) < 1e-6 and "loss_pixel_l2" not in m


def _key_with_spread_sigmas(shape):
    """A key whose two λ(σ) differ by more than 2×, so per-sample weighting is visible."""
    for i in range(100):
        key = jax.random.key(i)
        lam = np.asarray(loss_weight(draw_randomness(key, shape, PIXEL_CFG)["sigma"]))
        if lam.max() > 2 * lam.min():
            return key, lam
    raise AssertionError("no key with spread sigmas")


def test_pixel_losses_weight_each_sample_by_its_own_sigma(decoder, lpips):
    """Spec §9.10: the reference's LPIPS term is mean(lpips)·mean(λ); ours is mean(λ_i·lpips_i)."""
    batch = _batch()
    key, lam = _key_with_spread_sigmas(batch["latents"].shape)
    decoded = _decode_frames(decoder, batch["latents"])
    rng = np.random.default_rng(5)
    frames = np.asarray(decoded).copy()
    frames[0] = rng.uniform(-1, 1, frames[0].shape)                          # far
    frames[1] = np.clip(frames[1] + 0.05 * rng.standard_normal(frames[1].shape), -1, 1)  # close
    batch["frames"] = jnp.asarray(frames, jnp.float32)
    _, metrics = _oracle(batch, key, decoder, lpips)

    t = int(draw_randomness(key, batch["latents"].shape, PIXEL_CFG)["pixel_frame_index"][0])
    dec_t, tgt_t = decoded[:, t], batch["frames"][:, t]
    lp = np.asarray(jax.jit(lambda s, a, b: nnx.merge(nnx.graphdef(lpips), s)(a, b))(
        nnx.state(lpips), dec_t, tgt_t))
    l2 = np.asarray(jnp.mean(jnp.square(dec_t - tgt_t), axis=(1, 2, 3)))
    fixed, buggy = np.mean(lam * lp), np.mean(lp[None, :] * lam[:, None])  # (B,) × (B, 1)
    assert abs(fixed - buggy) > 0.05 * abs(fixed)
    np.testing.assert_allclose(float(metrics["loss_pixel_lpips"]), fixed, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["loss_pixel_l2"]), np.mean(lam * l2), rtol=1e-4)
    total = metrics["loss_diffusion"] + metrics["loss_pixel_l2"] + metrics["loss_pixel_lpips"]
    np.testing.assert_allclose(float(metrics["loss"]), float(total), rtol=1e-6)

    # Frames chosen by the data pipeline, one per sample: same weighting, their own positions.
    index = np.array([[t], [(t + 1) % T]])
    pre = dict(batch, pixel_frames=batch["frames"][np.arange(B)[:, None], index],
               pixel_frame_index=jnp.asarray(index, jnp.int32))
    del pre["frames"]
    _, m2 = _oracle(pre, key, decoder, lpips)
    dec_i = decoded[np.arange(B), index[:, 0]]
    l2_i = np.asarray(jnp.mean(jnp.square(dec_i - pre["pixel_frames"][:, 0]), axis=(1, 2, 3)))
    np.testing.assert_allclose(float(m2["loss_pixel_l2"]), np.mean(lam * l2_i), rtol=1e-4)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.slow  # one UNet + decoder + VGG16 backward compile (~60 s on 2 cores)
def test_pixel_loss_gradient_reaches_network_not_decoder_or_lpips(decoder, lpips):
    net, net_cfg = tiny_network("keyframe")
    batch = _batch(audio_dim=net_cfg.audio_dim)
    batch["frames"] = jnp.tanh(jnp.asarray(np.random.default_rng(2).standard_normal(
        (B, T, 2 * LAT, 2 * LAT, 3)), jnp.float32))
    cfg = ObjectiveConfig.for_kind("keyframe")
    (ng, ns), (dg, ds), (lg, ls) = nnx.split(net), nnx.split(decoder), nnx.split(lpips)

    def loss_fn(ns, ds, ls, batch, key):
        return keyface_loss(nnx.merge(ng, ns), batch, key, cfg, decoder=nnx.merge(dg, ds),
                            lpips=nnx.merge(lg, ls))

    (loss, metrics), (g_net, g_dec, g_lp) = jax.jit(jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True))(ns, ds, ls, batch, jax.random.key(0))
    assert np.isfinite(float(loss)) and float(metrics["loss_pixel_l2"]) > 0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves((g_dec, g_lp)))
    g_net = nnx.to_pure_dict(g_net)
    for part in (g_net["audio_proj"], g_net["diffusion_model"]["input_blocks"]):
        leaves = jax.tree.leaves(part)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
        assert max(float(jnp.abs(g).max()) for g in leaves) > 0


# ----------------------------------------------------------------------------- config errors


def test_lpips_without_weights_fails_at_start(tmp_path):
    cfg = ObjectiveConfig.for_kind("keyframe")
    with pytest.raises(ValueError, match="lpips_vgg_weights and lpips_lin_weights are not set"):
        lpips_for_objective(cfg)
    with pytest.raises(ValueError, match="lpips_lin_weights is not set"):
        lpips_for_objective(ObjectiveConfig.for_kind("keyframe", lpips_vgg_weights="/x/vgg16.pth"))
    with pytest.raises(ValueError, match=r"/x/vgg16.pth: no such file .*lpips_vgg_weights"):
        lpips_for_objective(ObjectiveConfig.for_kind(
            "keyframe", lpips_vgg_weights="/x/vgg16.pth", lpips_lin_weights="/x/vgg.pth"))
    with pytest.raises(ValueError, match="no LPIPS network"):
        check_objective_inputs(cfg, decoder=object(), lpips=None)
    with pytest.raises(ValueError, match="no LPIPS network"):
        keyface_loss(_Oracle(_batch()["latents"]), _batch(), jax.random.key(0), cfg,
                     decoder=object())
    with pytest.raises(ValueError, match="need the frozen VAE decoder"):
        check_objective_inputs(ObjectiveConfig.for_kind("keyframe", pixel_losses=("l2",)))
    # Configs that use no LPIPS need no weights.
    assert lpips_for_objective(ObjectiveConfig.for_kind("keyframe", pixel_losses=("l2",))) is None
    assert lpips_for_objective(ObjectiveConfig.for_kind("interpolation")) is None


def test_config_presets_and_validation():
    key_cfg = ObjectiveConfig.for_kind("keyframe")
    interp_cfg = ObjectiveConfig.for_kind("interpolation")
    assert (key_cfg.lambda_lower, key_cfg.pixel_weight) == (3.0, 1.0)
    assert key_cfg.pixel_losses == ("l2", "lpips")
    assert (interp_cfg.lambda_lower, interp_cfg.pixel_enabled) == (2.0, False)
    for cfg in (key_cfg, interp_cfg):
        assert (cfg.p_mean, cfg.p_std) == (1.0, 1.2)
        assert (cfg.cond_drop_rate, cfg.audio_drop_rate) == (0.1, 0.2)
    from_dict = ObjectiveConfig.from_dict(dict(kind="interpolation", pixel_losses=["l2"]))
    assert from_dict.pixel_losses == ("l2",)
    for kind, module in (("keyframe", keyframe), ("interpolation", interpolation)):
        section = module.get_config("full").objective
        assert ObjectiveConfig.from_dict(section, kind=kind) == ObjectiveConfig.for_kind(kind)
    with pytest.raises(ValueError, match="unknown fields.*lambda_low"):
        ObjectiveConfig.from_dict(dict(lambda_low=3.0))
    with pytest.raises(ValueError, match="pixel_losses"):
        ObjectiveConfig(pixel_losses=("l1",))
    with pytest.raises(ValueError, match="audio_drop_rate"):
        ObjectiveConfig(audio_drop_rate=1.5)
