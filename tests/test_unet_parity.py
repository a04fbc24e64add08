"""Numerical parity of our VideoUNet with diffusers' UNetSpatioTemporalConditionModel (fp32)."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from keyface_jax.testing.parity import check_unet_against_diffusers  # noqa: E402

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
