"""Sampler tests: σ schedule, Euler loop, guidance algebra, closed-form Gaussian check, and the
jitted samplers on the tiny networks (guided step vs separate calls, batch invariance, 1- vs
4-device mesh).

Most tests use analytic or toy denoisers; the tiny-network ones keep frames and batch small because
each compilation costs 10-30 s on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from helpers import network_inputs, tiny_network
from keyface_jax.diffusion.scalings import denoise, vscaling
from keyface_jax.sampling import guidance, guided, sampler
from keyface_jax.sampling.euler import euler_step, initial_noise, sample
from keyface_jax.sampling.schedules import AYS_SIGMAS, ays_sigmas

REFERENCE_AYS = [700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002]


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def conditions_only(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("x", "c_noise")}


# ---------------------------------------------------------------------------------------- schedule

def test_ays_default_is_the_reference_list_plus_zero():
    sigmas = ays_sigmas(10)
    assert sigmas.dtype == np.float32 and sigmas.shape == (12,)
    np.testing.assert_array_equal(sigmas, np.asarray(REFERENCE_AYS + [0.0], np.float32))
    assert list(AYS_SIGMAS) == REFERENCE_AYS


def test_ays_more_steps_interpolate_log_linearly():
    # 11 points on the same uniform grid reproduce the list (the reference's 10/11 coincidence).
    np.testing.assert_allclose(ays_sigmas(11), ays_sigmas(10), rtol=1e-6)
    # 21 points put one new point halfway (in ln σ) between each pair: the geometric mean.
    sigmas = ays_sigmas(21).astype(np.float64)
    assert sigmas.shape == (22,) and sigmas[-1] == 0.0
    np.testing.assert_allclose(sigmas[0:-1:2], REFERENCE_AYS, rtol=1e-6)
    base = np.asarray(REFERENCE_AYS)
    np.testing.assert_allclose(sigmas[1:-1:2], np.sqrt(base[:-1] * base[1:]), rtol=1e-5)
    assert np.all(np.diff(ays_sigmas(37)) < 0)


def test_ays_rejects_fewer_than_ten_steps():
    with pytest.raises(ValueError, match="num_steps >= 10"):
        ays_sigmas(9)


# ---------------------------------------------------------------------------------------- scalings

def test_vscaling_is_v_prediction_with_unit_sigma_data():
    sigma = jnp.asarray([0.002, 1.0, 700.0])
    c_skip, c_out, c_in, c_noise = vscaling(sigma)
    s = np.asarray(sigma, np.float64)
    np.testing.assert_allclose(c_skip, 1 / (s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_out, -s / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(c_noise, 0.25 * np.log(s), rtol=1e-6)


def test_denoise_broadcasts_sigma_per_sample():
    x, f = rand(0, 2, 3, 4, 4, 4), rand(1, 2, 3, 4, 4, 4)
    sigma = jnp.asarray([0.5, 7.0])
    seen = {}

    def network(x_in, c_noise, *, extra):
        seen.update(x_in=x_in, c_noise=c_noise, extra=extra)
        return f

    out = denoise(network, x, sigma, extra=3)
    s = np.asarray(sigma).reshape(2, 1, 1, 1, 1)
    np.testing.assert_allclose(seen["x_in"], x / np.sqrt(s**2 + 1), rtol=1e-6)
    np.testing.assert_allclose(seen["c_noise"], 0.25 * np.log(np.asarray(sigma)), rtol=1e-6)
    assert seen["extra"] == 3
    np.testing.assert_allclose(out, x / (s**2 + 1) - s / np.sqrt(s**2 + 1) * f,
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ Euler loop

def test_euler_step_by_hand():
    x, d = rand(0, 2, 5), rand(1, 2, 5)
    np.testing.assert_allclose(euler_step(x, d, 4.0, 1.5), x + (1.5 - 4.0) * (x - d) / 4.0,
                               rtol=1e-6)
    np.testing.assert_allclose(euler_step(x, d, 0.002, 0.0), d, atol=1e-6)  # last step lands on D


def test_loop_makes_one_evaluation_per_sigma_pair_and_scales_the_noise():
    sigmas = jnp.asarray(ays_sigmas(10))
    noise = rand(0, 3, 2)
    calls = []

    def record(x, sigma):
        calls.append(np.asarray(sigma))
        if len(calls) == 1:  # first input is noise·√(1 + σ0²)
            np.testing.assert_allclose(x, noise * np.sqrt(1 + 700.0**2), rtol=1e-6)
        return jnp.zeros_like(x)

    out = sample(record, noise, sigmas, python_loop=True)
    assert len(calls) == 11  # the reference's "11/12"
    np.testing.assert_allclose(np.stack(calls), np.repeat(np.asarray(sigmas[:-1])[:, None], 3, 1))
    np.testing.assert_allclose(out, 0.0, atol=1e-6)  # D = 0 everywhere → x lands on 0


def gaussian_ideal_denoiser(mu, s):
    """Exact D(x; σ) = E[x0 | x] for x0 ~ N(μ, s²) per channel (last axis)."""
    return lambda x, sigma: mu + s**2 / (s**2 + sigma[:, None] ** 2) * (x - mu)


@pytest.fixture(scope="module")
def standardised_noise():
    noise = np.random.default_rng(0).standard_normal((16384, 4))
    # Exact moments, so only the sampler's own error remains.
    noise = (noise - noise.mean(0)) / noise.std(0)
    return jnp.asarray(noise, jnp.float32)


def test_ideal_gaussian_denoiser_recovers_the_data_distribution(standardised_noise):
    mu = jnp.asarray([0.5, -1.0, 0.2, 0.0])
    s = jnp.asarray([0.6, 0.3, 2.0, 1.0])
    # A fine (1000-step) log-linear AYS schedule: Euler's discretisation error is then < 0.3 %.
    out = jax.jit(lambda n: sample(gaussian_ideal_denoiser(mu, s), n, ays_sigmas(1000)))(
        standardised_noise)
    np.testing.assert_allclose(out.mean(0), mu, atol=2e-3 * float(s.max()))
    np.testing.assert_allclose(out.std(0), s, rtol=5e-3)


def test_ten_step_sampler_matches_the_analytic_euler_recursion(standardised_noise):
    """With the ideal Gaussian denoiser each Euler step scales (x − μ) by 1 + (σ' − σ)σ/(s² + σ²);
    the 11-step AYS sampler must reproduce that product exactly (it under-disperses by ~20 %, a
    property of 11 first-order steps, not a bug)."""
    mu, s = jnp.asarray([0.5, -1.0, 0.2, 0.0]), jnp.asarray([0.6, 0.3, 2.0, 1.0])
    sigmas = ays_sigmas(10).astype(np.float64)
    out = jax.jit(lambda n: sample(gaussian_ideal_denoiser(mu, s), n, sigmas))(standardised_noise)
    s64, mu64 = np.asarray(s, np.float64), np.asarray(mu, np.float64)
    k = np.prod([1 + (b - a) * a / (s64**2 + a**2) for a, b in zip(sigmas[:-1], sigmas[1:])], 0)
    np.testing.assert_allclose(out.std(0), k * np.sqrt(1 + sigmas[0] ** 2), rtol=1e-4)
    np.testing.assert_allclose(out.mean(0), mu64 * (1 - k), atol=1e-5)


def test_fori_and_python_loops_agree():
    mu, s = jnp.asarray([0.3]), jnp.asarray([0.7])
    noise, sigmas = rand(3, 8, 1), ays_sigmas(12)
    fn = gaussian_ideal_denoiser(mu, s)
    np.testing.assert_allclose(jax.jit(lambda n: sample(fn, n, sigmas))(noise),
                               sample(fn, noise, sigmas, python_loop=True), rtol=1e-5, atol=1e-6)


def test_initial_noise_depends_only_on_each_key():
    keys = jax.random.split(jax.random.key(7), 5)
    batch = initial_noise(keys, (3, 2, 2, 4))
    assert batch.shape == (5, 3, 2, 2, 4)
    for i in range(5):
        np.testing.assert_array_equal(batch[i], initial_noise(keys[i:i + 1], (3, 2, 2, 4))[0])


# ---------------------------------------------------------------------------------------- guidance

def test_guidance_algebra_by_hand():
    d_u, d_r, d_f = (np.asarray(rand(i, 2, 3, 2, 2, 4), np.float64) for i in range(3))
    np.testing.assert_allclose(guidance.audio_ref_cfg(d_u, d_r, d_f),
                               d_u + 2.0 * (d_r - d_u) + 5.0 * (d_f - d_r), rtol=1e-6)
    np.testing.assert_allclose(guidance.audio_ref_cfg(d_u, d_r, d_f, 1.0, 1.0), d_f, rtol=1e-6)
    np.testing.assert_allclose(guidance.audio_ref_cfg(d_u, d_r, d_f, 0.0, 1.0), d_r, rtol=1e-6)
    np.testing.assert_allclose(guidance.autoguidance(d_u, d_f), 2.0 * d_f - d_u, rtol=1e-6)
    np.testing.assert_allclose(guidance.autoguidance(d_u, d_f, 1.0), d_f, rtol=1e-6)
    d_b = np.asarray(rand(3, 2, 3, 2, 2, 4), np.float64)
    np.testing.assert_allclose(guidance.audio_ref_autoguidance(d_u, d_r, d_f, d_b, 3.0, 1.5, 2.5),
                               d_u + 1.5 * (d_r - d_u) + 3.0 * (d_f - d_r) + 1.5 * (d_f - d_b),
                               rtol=1e-6)
    np.testing.assert_allclose(guidance.audio_ref_autoguidance(d_u, d_r, d_f, d_b, 1.0, 1.0, 3.0),
                               guidance.autoguidance(d_b, d_f, 3.0), rtol=1e-6)
    scales = guidance.linear_frame_scales(3)
    np.testing.assert_allclose(scales, [1.0, 1.75, 2.5])
    out = guidance.linear_prediction_cfg(d_u, d_f, scales)
    for t, w in enumerate([1.0, 1.75, 2.5]):
        np.testing.assert_allclose(out[:, t], d_u[:, t] + w * (d_f[:, t] - d_u[:, t]), rtol=1e-5)


def toy_keyframe_network(x, c_noise, *, identity, audio, valence, arousal, audio_keep=None,
                         identity_keep=None):
    """Sensitive to every input, to each sample's own flags and to the sample's position."""
    ik = identity_keep.reshape(-1, 1, 1, 1, 1)
    ak = audio_keep.reshape(-1, 1, 1, 1, 1)
    a = audio.mean(axis=(2, 3))[:, :, None, None, None]
    emo = (valence + 2 * arousal)[:, :, None, None, None]
    noise_level = 1 + c_noise[:, None, None, None, None]
    return jnp.tanh(x) * noise_level + ik * identity[:, None] + ak * a + emo


def test_folded_keyframe_guidance_matches_three_separate_calls():
    b, t = 3, 2
    conds = dict(identity=rand(1, b, 4, 4, 4), audio=rand(2, b, t, 2, 8),
                 valence=rand(3, b, t), arousal=rand(4, b, t))
    x, sigma = rand(0, b, t, 4, 4, 4), jnp.asarray([0.3, 2.0, 40.0])
    guided_fn = guided.keyframe_cfg_denoiser(toy_keyframe_network, conds, 4.0, 1.5)
    flags = lambda a, i: dict(audio_keep=jnp.full((b,), a), identity_keep=jnp.full((b,), i))
    d_u, d_r, d_f = (denoise(toy_keyframe_network, x, sigma, **conds, **flags(a, i))
                     for a, i in [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
    expect = np.asarray(d_u) + 1.5 * (np.asarray(d_r) - d_u) + 4.0 * (np.asarray(d_f) - d_r)
    np.testing.assert_allclose(guided_fn(x, sigma), expect, rtol=1e-5, atol=1e-5)


def test_folded_linear_guidance_matches_two_separate_calls():
    b, t = 2, 3
    conds = dict(identity=rand(1, b, 4, 4, 4), audio=rand(2, b, t, 2, 8),
                 valence=rand(3, b, t), arousal=rand(4, b, t))
    x, sigma = rand(0, b, t, 4, 4, 4), jnp.asarray([1.0, 9.0])
    scales = guidance.linear_frame_scales(t)
    fn = guided.linear_cfg_denoiser(toy_keyframe_network, conds, guided.KEYFRAME_UNCOND, scales)
    ones, zeros = jnp.ones((b,)), jnp.zeros((b,))
    d_u = denoise(toy_keyframe_network, x, sigma, **conds, audio_keep=zeros, identity_keep=zeros)
    d_c = denoise(toy_keyframe_network, x, sigma, **conds, audio_keep=ones, identity_keep=ones)
    np.testing.assert_allclose(fn(x, sigma), guidance.linear_prediction_cfg(d_u, d_c, scales),
                               rtol=1e-5, atol=1e-5)


def test_guidance_flags_in_conditions_are_rejected():
    conds = dict(identity=rand(1, 1, 4, 4, 4), audio_keep=jnp.ones((1,)))
    with pytest.raises(ValueError, match="audio_keep"):
        guided.keyframe_cfg_denoiser(toy_keyframe_network, conds)


class ToyInterpolationNet(nnx.Module):
    def __init__(self, seed: int):
        self.proj = nnx.Linear(4, 4, rngs=nnx.Rngs(seed))
        self.audio_proj = nnx.Linear(8, 4, rngs=nnx.Rngs(seed + 1))

    def __call__(self, x, c_noise, *, first, last, audio):
        a = self.audio_proj(audio.mean(2))[:, :, None, None, :]
        return self.proj(x) * c_noise[:, None, None, None, None] + a + (first - last)[:, None]


def test_stacked_and_sequential_autoguidance_agree_with_hand_computation():
    good, bad = ToyInterpolationNet(0), ToyInterpolationNet(5)
    graphdef, good_state = nnx.split(good)
    _, bad_state = nnx.split(bad)
    conds = dict(first=rand(1, 2, 3, 3, 4), last=rand(2, 2, 3, 3, 4), audio=rand(3, 2, 5, 2, 8))
    x, sigma = rand(0, 2, 5, 3, 3, 4), jnp.asarray([0.7, 12.0])
    expect = (denoise(bad, x, sigma, **conds)
              + 3.0 * (denoise(good, x, sigma, **conds) - denoise(bad, x, sigma, **conds)))
    sequential = guided.autoguidance_denoiser(good, bad, conds, 3.0)(x, sigma)
    stacked_state = jax.tree.map(lambda b_, g: jnp.stack([b_, g]), bad_state, good_state)
    stacked = guided.stacked_autoguidance_denoiser(graphdef, stacked_state, conds, 3.0)(x, sigma)
    np.testing.assert_allclose(sequential, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stacked, expect, rtol=1e-5, atol=1e-5)


def test_bad_network_borrows_the_good_audio_projection():
    _, good = nnx.split(tiny_network("interpolation", seed=0)[0])
    _, bad = nnx.split(tiny_network("interpolation", seed=3)[0])
    shared = sampler.share_audio_projection(bad, good)
    assert jax.tree.structure(shared) == jax.tree.structure(bad)
    np.testing.assert_array_equal(shared["audio_proj"]["kernel"][...],
                                  good["audio_proj"]["kernel"][...])
    np.testing.assert_array_equal(shared["learned_mask"][...], bad["learned_mask"][...])
    leaf = ("diffusion_model", "out", 2, "kernel")
    get = lambda st: dict(nnx.to_flat_state(st))[leaf][...]
    np.testing.assert_array_equal(get(shared), get(bad))
    assert not np.array_equal(bad["audio_proj"]["kernel"][...], good["audio_proj"]["kernel"][...])


# --------------------------------------------------------------------------------- tiny networks

@pytest.fixture(scope="module")
def keyframe_net():
    net, config = tiny_network("keyframe")
    graphdef, state = nnx.split(net)
    return graphdef, state, config


@pytest.fixture(scope="module")
def interpolation_nets():
    good, config = tiny_network("interpolation", seed=0)
    bad, _ = tiny_network("interpolation", seed=11)
    graphdef, good_state = nnx.split(good)
    return graphdef, good_state, nnx.split(bad)[1], config


def test_guided_keyframe_step_on_the_network_matches_separate_calls(keyframe_net):
    graphdef, state, config = keyframe_net
    inputs = network_inputs(config, batch=2, frames=3)
    conds, x = conditions_only(inputs), inputs["x"] * 5.0
    sigma = jnp.asarray([5.0, 0.5])

    @jax.jit
    def guided_and_branches(state, x, sigma, conds):
        net = nnx.merge(graphdef, state)
        fn = guided.keyframe_cfg_denoiser(net, conds, 5.0, 2.0)
        keep = lambda v: jnp.full((2,), v)
        branches = [denoise(net, x, sigma, **conds, audio_keep=keep(a), identity_keep=keep(i))
                    for a, i in [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)]]
        return fn(x, sigma), branches

    out, (d_u, d_r, d_f) = guided_and_branches(state, x, sigma, conds)
    d_u, d_r, d_f = (np.asarray(d, np.float64) for d in (d_u, d_r, d_f))
    assert np.abs(d_f - d_r).max() > 1e-3 and np.abs(d_r - d_u).max() > 1e-3  # flags matter
    np.testing.assert_allclose(out, d_u + 2.0 * (d_r - d_u) + 5.0 * (d_f - d_r),
                               rtol=1e-4, atol=1e-4)


def test_keyframe_batch_matches_single_calls_and_scales_do_not_recompile(keyframe_net):
    graphdef, state, config = keyframe_net
    conds = conditions_only(network_inputs(config, batch=3, frames=3, seed=4))
    keys = jax.random.split(jax.random.key(0), 3)
    batch = sampler.sample_keyframes(graphdef, state, conds, keys)
    assert batch.shape == (3, 3, 16, 16, 4) and bool(jnp.all(jnp.isfinite(batch)))
    for i in range(3):
        one = {k: v[i:i + 1] for k, v in conds.items()}
        single = sampler.sample_keyframes(graphdef, state, one, keys[i:i + 1])
        np.testing.assert_allclose(single[0], batch[i], rtol=1e-4, atol=1e-4)
    compiled = sampler._keyframes._cache_size()
    other = sampler.sample_keyframes(graphdef, state, one, keys[2:3], audio_scale=1.0, ref_scale=3)
    assert sampler._keyframes._cache_size() == compiled
    assert np.abs(np.asarray(other[0]) - np.asarray(batch[2])).max() > 1e-3


def test_keyframe_autoguidance_adds_the_weaker_networks_term(keyframe_net):
    graphdef, state, config = keyframe_net
    conds = conditions_only(network_inputs(config, batch=2, frames=3, seed=6))
    keys = jax.random.split(jax.random.key(2), 2)
    plain = sampler.sample_keyframes(graphdef, state, conds, keys, audio_scale=3, ref_scale=1)
    # the same network as its own weaker one: the autoguidance term is 0 at every step
    same = sampler.sample_keyframes(graphdef, state, conds, keys, audio_scale=3, ref_scale=1,
                                    bad_state=state, autoguidance_scale=4.0)
    np.testing.assert_allclose(same, plain, rtol=1e-5, atol=1e-5)
    bad = nnx.split(tiny_network("keyframe", seed=5)[0])[1]
    sample = lambda **kw: sampler.sample_keyframes(graphdef, state, conds, keys, audio_scale=3,
                                                   ref_scale=1, **kw)
    # scale 1: the term vanishes whatever the weaker network
    np.testing.assert_allclose(sample(bad_state=bad, autoguidance_scale=1.0), plain,
                               rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(sample(bad_state=bad, autoguidance_scale=3.0)) - plain).max() > 1e-3


def test_interpolation_on_a_4_device_mesh_matches_one_device(interpolation_nets):
    graphdef, good, bad, config = interpolation_nets
    assert len(jax.devices()) >= 4, "tests/conftest.py forces 4 host devices"
    conds = conditions_only(network_inputs(config, batch=4, frames=3, seed=9))
    keys = jax.random.split(jax.random.key(1), 4)
    local = sampler.sample_interpolation(graphdef, good, bad, conds, keys)

    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    on_batch = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = sampler.sample_interpolation(
        graphdef, jax.device_put(good, replicated), jax.device_put(bad, replicated),
        jax.device_put(conds, on_batch), jax.device_put(keys, on_batch))
    assert len(sharded.sharding.device_set) == 4
    assert sharded.sharding.is_equivalent_to(on_batch, sharded.ndim)
    np.testing.assert_allclose(sharded, local, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(local).std()) > 0.1


def test_preview_sampler_runs_with_the_linear_guider(keyframe_net):
    graphdef, state, config = keyframe_net
    conds = conditions_only(network_inputs(config, batch=1, frames=3, seed=2))
    keys = jax.random.split(jax.random.key(3), 1)
    out = sampler.sample_preview(graphdef, state, conds, keys)
    full = sampler.sample_preview(graphdef, state, conds, keys, min_scale=1.0, max_scale=1.0)
    assert out.shape == (1, 3, 16, 16, 4) and bool(jnp.all(jnp.isfinite(out)))
    assert np.abs(np.asarray(out) - np.asarray(full)).max() > 1e-3


def test_interpolation_audio_cfg_is_guidance_by_the_audio_dropped_network(interpolation_nets):
    """audio_cfg at scale 1 is the plain conditional sampler; at scale 0 it is the sampler of the
    network with its audio dropped; between, it moves away from the audio-dropped trajectory."""
    graphdef, good, _, config = interpolation_nets
    conds = conditions_only(network_inputs(config, batch=2, frames=3, seed=11))
    keys = jax.random.split(jax.random.key(5), 2)
    plain = sampler.sample_interpolation(graphdef, good, None, conds, keys)
    one = sampler.sample_interpolation(graphdef, good, None, conds, keys, audio_cfg=True, scale=1.0)
    np.testing.assert_allclose(one, plain, rtol=1e-4, atol=1e-4)
    # the network without audio: its audio projection outputs zeros (what audio_keep=0 does)
    mute = nnx.merge_state(good, nnx.State({"audio_proj": jax.tree.map(jnp.zeros_like,
                                                                        good["audio_proj"])}))
    no_audio = sampler.sample_interpolation(graphdef, mute, None, conds, keys)
    zero = sampler.sample_interpolation(graphdef, good, None, conds, keys, audio_cfg=True, scale=0.0)
    np.testing.assert_allclose(zero, no_audio, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(no_audio) - np.asarray(plain)).max() > 1e-3
    with pytest.raises(ValueError, match="bad_state=None"):
        sampler.sample_interpolation(graphdef, good, good, conds, keys, audio_cfg=True)
