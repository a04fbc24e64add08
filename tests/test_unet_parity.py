"""Numerical parity of our VideoUNet with diffusers' UNetSpatioTemporalConditionModel (fp32)."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from keyface_jax.testing.unet_parity import check_unet_against_diffusers  # noqa: E402

CA_DOWN, DOWN = "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"
CA_UP, UP = "CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"

CONFIGS = {
    # The SVD layout in miniature: attention on all but the lowest level.
    "svd_like": dict(in_channels=8, out_channels=4, down_block_types=(CA_DOWN, DOWN),
                     up_block_types=(UP, CA_UP), block_out_channels=(32, 64), layers_per_block=1,
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
                     cross_attention_dim=32, num_attention_heads=(2, 4), num_frames=4),
    # Three levels, uneven layers and depths per level, 9 input channels (interpolation-like).
    "three_levels": dict(in_channels=9, out_channels=3, down_block_types=(CA_DOWN, CA_DOWN, DOWN),
                         up_block_types=(UP, CA_UP, CA_UP), block_out_channels=(32, 64, 96),
                         layers_per_block=(2, 1, 1), transformer_layers_per_block=(1, 2, 1),
                         addition_time_embed_dim=4, projection_class_embeddings_input_dim=12,
                         cross_attention_dim=16, num_attention_heads=(1, 2, 3), num_frames=3),
    # Attention everywhere, asymmetric up/down attention placement, one head per level.
    "asymmetric": dict(in_channels=4, out_channels=4, down_block_types=(DOWN, CA_DOWN),
                       up_block_types=(UP, CA_UP), block_out_channels=(64, 64), layers_per_block=1,
                       addition_time_embed_dim=6, projection_class_embeddings_input_dim=18,
                       cross_attention_dim=24, num_attention_heads=1, num_frames=5),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_matches_diffusers(name):
    err = check_unet_against_diffusers(CONFIGS[name], seed=sorted(CONFIGS).index(name))
    assert err <= 1e-5, f"{name}: relative error {err:.3e}"


@pytest.mark.parametrize("kind", ["keyframe", "interpolation"])
def test_full_parameter_counts_equal_diffusers_plus_keyface_extras(kind):
    """The paper-size networks have exactly the parameters of diffusers' SVD UNet with KeyFace's input
    channels and label width, plus the audio projection (and the interpolation mask token)."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from configs import interpolation, keyframe
    from keyface_jax.config_lib import network_config
    from keyface_jax.models.build import abstract_network, count_params

    config = network_config((keyframe if kind == "keyframe" else interpolation).get_config("full").model)
    with torch.device("meta"):  # shapes only: no 6 GB of weights on the CPU
        reference = UNetSpatioTemporalConditionModel(
            in_channels=config.unet.in_channels,
            projection_class_embeddings_input_dim=config.unet.adm_in_channels)
    expected = sum(p.numel() for p in reference.parameters())
    expected += config.audio_dim * config.unet.context_dim + config.unet.context_dim
    if kind == "interpolation":
        expected += config.latent_size ** 2 * config.latent_channels
    assert count_params(abstract_network(config)) == expected
