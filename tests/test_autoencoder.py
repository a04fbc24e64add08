"""SVD autoencoder: parity with diffusers, key renaming, and the generic torch ↔ NNX loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from keyface_jax.conversion.diffusers_vae import (diffusers_vae_key_to_sgm,
                                                  diffusers_vae_state_dict_to_sgm,
                                                  vae_config_from_diffusers)
from keyface_jax.conversion.nnx_torch import (export_torch_state_dict, load_torch_state_dict,
                                              nnx_path_to_torch_key, nnx_to_torch_value)
from keyface_jax.models.autoencoder import SCALE_FACTOR, AutoencoderKL, VAEConfig

SMALL = dict(block_out_channels=[32, 64], layers_per_block=2, latent_channels=4)
CONFIGS = [
    SMALL,
    dict(block_out_channels=[32, 32, 64], layers_per_block=1, latent_channels=3,
         in_channels=4, out_channels=2),
    dict(block_out_channels=[64], layers_per_block=2, latent_channels=8, in_channels=1,
         out_channels=3),
]
SVD = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
           layers_per_block=2, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4)


@pytest.fixture(scope="module")
def small_pair():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from keyface_jax.testing.vae_parity import make_random_diffusers_vae, nnx_vae_from_diffusers
    ref = make_random_diffusers_vae(SMALL, seed=3)
    return ref, nnx_vae_from_diffusers(ref, SMALL)


def _tiny_model(seed=0, block_out_channels=(32, 64)):
    """Random weights loaded into an abstract model: eager NNX init is slow on CPU."""
    cfg = vae_config_from_diffusers(dict(block_out_channels=block_out_channels, layers_per_block=1))
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    sd = {nnx_path_to_torch_key(path): nnx_to_torch_value(
              0.1 * rng.standard_normal(var.get_value().shape, np.float32), str(path[-1]))
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    load_torch_state_dict(model, sd)
    return model


@pytest.mark.parametrize("index", range(len(CONFIGS)))
def test_parity_with_diffusers(index):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from keyface_jax.testing.vae_parity import check_vae_against_diffusers
    err = check_vae_against_diffusers(CONFIGS[index], seed=index)
    assert err <= 1e-5, err


def test_bf16_compute_close_to_fp32(small_pair):
    from keyface_jax.testing.torch_reference import relative_error
    from keyface_jax.testing.vae_parity import nnx_vae_from_diffusers, random_inputs, run_nnx
    ref, ours = small_pair
    ours_bf16 = nnx_vae_from_diffusers(ref, SMALL, dtype=jnp.bfloat16)
    assert ours_bf16.decoder.conv_in.kernel[...].dtype == jnp.float32  # fp32 master weights
    images, latents = random_inputs(SMALL, seed=0, num_frames=3)  # shapes of the parity run
    pairs = zip(run_nnx(ours_bf16, images, latents, 3), run_nnx(ours, images, latents, 3))
    err = max(relative_error(a, b) for a, b in pairs)
    assert err < 5e-2, err


def test_key_round_trip_and_shapes_match_nnx_tree(small_pair):
    ref, ours = small_pair
    keys = list(ref.state_dict())
    sgm_keys = [diffusers_vae_key_to_sgm(k, SMALL) for k in keys]
    assert len(set(sgm_keys)) == len(keys)   # one-to-one: no two keys land on one parameter
    assert set(sgm_keys) == set(export_torch_state_dict(ours))
    assert diffusers_vae_key_to_sgm("decoder.up_blocks.0.resnets.1.temporal_res_block.norm1.weight",
                                    SMALL) == "decoder.up.1.block.1.time_stack.in_layers.0.weight"
    assert diffusers_vae_key_to_sgm("decoder.time_conv_out.bias", SMALL) == \
        "decoder.conv_out.time_mix_conv.bias"


def test_full_svd_config_keys_and_shapes():
    """Every key of the real-size diffusers SVD VAE (built on the meta device) lands on an NNX
    parameter of the right shape, one to one."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLTemporalDecoder(**SVD)
    sd = {k: np.broadcast_to(np.zeros((), np.float32), v.shape) for k, v in ref.state_dict().items()}
    sgm_sd = diffusers_vae_state_dict_to_sgm(sd, SVD)
    assert len(sgm_sd) == len(sd)   # one-to-one
    model = nnx.eval_shape(lambda: AutoencoderKL(vae_config_from_diffusers(SVD), rngs=nnx.Rngs(0)))
    load_torch_state_dict(nnx.state(model, nnx.Param), sgm_sd)  # strict: raises on any mismatch


def test_loaded_weights_export_bit_exact(small_pair):
    ref, ours = small_pair
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    exported = export_torch_state_dict(ours)
    for key, value in diffusers_vae_state_dict_to_sgm(sd, SMALL).items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_export_import_round_trip_bit_exact():
    model = _tiny_model(seed=1)
    sd = export_torch_state_dict(model)
    assert sd["decoder.conv_out.time_mix_conv.weight"].shape == (3, 3, 3, 1, 1)  # OIDHW
    assert sd["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    target = nnx.eval_shape(lambda: _tiny_model(seed=2))
    state = load_torch_state_dict(target, sd)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in nnx.to_flat_state(state):
        np.testing.assert_array_equal(var.get_value(), flat[path].get_value(),
                                      err_msg=nnx_path_to_torch_key(path))
    assert var.get_metadata()["out_sharding"] == flat[path].get_metadata()["out_sharding"]


def test_strict_loader_errors():
    target = nnx.eval_shape(_tiny_model)
    sd = export_torch_state_dict(_tiny_model())
    missing = dict(sd)
    del missing["decoder.up.0.block.1.mix_factor"]
    with pytest.raises(ValueError, match=r"missing keys.*\n.*decoder\.up\.0\.block\.1\.mix_factor"):
        load_torch_state_dict(target, missing)
    with pytest.raises(ValueError, match=r"unexpected keys.*\n.*decoder\.bogus\.weight"):
        load_torch_state_dict(target, {**sd, "decoder.bogus.weight": np.zeros(3)})
    wrong = {**sd, "encoder.conv_in.weight": np.zeros((32, 3, 5, 5), np.float32)}
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight: checkpoint shape \(32, 3, 5, 5\)"
                                         r".*model shape \(3, 3, 3, 32\)"):
        load_torch_state_dict(target, wrong)


@nnx.jit
def _api_outputs(model, x, z, key):
    mean, logvar = model.encode(x)
    return dict(mean=mean, logvar=logvar, mode=model.encode_to_diffusion(x, mode=True),
                sample=model.encode_to_diffusion(x, key),
                video=model.decode_from_diffusion(z),
                flat=model.decode(z.reshape(-1, *z.shape[2:]) / SCALE_FACTOR, num_frames=z.shape[1]))


def test_scaling_and_layouts():
    model = _tiny_model(block_out_channels=(32,))  # one level: this test checks the API only
    rng = np.random.default_rng(0)  # numpy inputs: jax.random.normal compiles slowly on CPU
    x = rng.standard_normal((2, 2, 8, 8, 3), np.float32)  # [B, T, H, W, C]
    z = rng.standard_normal((2, 2, 8, 8, 4), np.float32)
    out = _api_outputs(model, x, z, jax.random.key(1))
    assert out["mean"].shape == out["logvar"].shape == (2, 2, 8, 8, 4)
    np.testing.assert_allclose(out["mode"], out["mean"] * SCALE_FACTOR, rtol=1e-6)
    assert not np.allclose(out["sample"], out["mode"])
    assert out["video"].shape == (2, 2, 8, 8, 3)
    np.testing.assert_allclose(out["video"].reshape(out["flat"].shape), out["flat"],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="PRNG key"):
        model.encode_to_diffusion(x)


def test_decoder_only_and_sgm_config():
    cfg = VAEConfig.from_sgm(32, (1, 2), 1, 4, use_encoder=False)
    assert cfg.block_out_channels == (32, 64)
    keys = export_torch_state_dict(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))
    assert keys and all(k.startswith("decoder.") for k in keys)


def test_latent_rescaling_keeps_reconstructions():
    """training.latent_scale folds a factor into quant_conv and the decoder's conv_in: latents
    (means and samples) scale by it, reconstructions do not change."""
    from keyface_jax.training.latent_scale import factor_for, rescale_latents

    model = _tiny_model(block_out_channels=(32,))
    graphdef, params = nnx.split(model)
    factor = 1.7
    scaled = nnx.merge(graphdef, nnx.State(rescale_latents(params.to_pure_dict(), factor)))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    (mean, logvar), (mean_s, logvar_s) = model.encode(x), scaled.encode(x)
    np.testing.assert_allclose(mean_s, factor * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar_s, logvar + 2 * np.log(factor), rtol=1e-5, atol=1e-5)
    key = jax.random.key(3)
    np.testing.assert_allclose(scaled.encode_to_diffusion(x, key), factor * model.encode_to_diffusion(x, key),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scaled.decode(mean_s, num_frames=1), model.decode(mean, num_frames=1),
                               rtol=1e-4, atol=1e-5)
    assert factor_for(2.0) == pytest.approx(1 / (2.0 * SCALE_FACTOR))
    with pytest.raises(ValueError, match="standard deviation"):
        factor_for(0.0)


def test_generation_decodes_frame_by_frame_or_in_groups():
    """generation.decoding.decode_segments: decode_frames=1 is each frame decoded on its own (as
    KeyFace decodes), 14 the whole segment through the temporal layers; the two differ."""
    from keyface_jax.generation.decoding import decode_segments
    from keyface_jax.models.autoencoder import from_diffusion_space

    model = _tiny_model(block_out_channels=(32,))
    z = np.random.default_rng(1).standard_normal((2, 14, 4, 4, 4)).astype(np.float32)
    per_frame = np.asarray(decode_segments(model, z, 1))
    whole = np.asarray(decode_segments(model, z, 14))
    assert per_frame.shape == whole.shape == (2, 14, 4, 4, 3)
    np.testing.assert_allclose(per_frame[1, 5], model.decode(from_diffusion_space(z[1, 5:6]), num_frames=1)[0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole, model.decode(from_diffusion_space(z)), rtol=1e-5, atol=1e-5)
    assert np.abs(per_frame - whole).max() > 1e-3
    with pytest.raises(ValueError, match="does not divide"):
        decode_segments(model, z, 3)
    from keyface_jax.generation.pipeline import GenerationOptions
    with pytest.raises(ValueError, match="decode_frames=3 must divide"):
        GenerationOptions(decode_frames=3)
