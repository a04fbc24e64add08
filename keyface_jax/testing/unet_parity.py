"""Numerical parity of our VideoUNet with diffusers' PyTorch SVD UNet (an independent
implementation). torch and diffusers are test-only dependencies, imported inside the functions.

Each check builds the PyTorch module from a diffusers config, overwrites every parameter with seeded
random values (so nothing agrees merely by being zero-initialised), converts the weights with our
importer, runs both on the same random inputs and returns max|ours − ref| / max|ref|.
"""

from __future__ import annotations

import numpy as np

from keyface_jax.testing.torch_reference import (randomize_torch_parameters, relative_error,
                                                torch_state_dict_numpy)


def _unet_inputs(cfg: dict, rng: np.random.Generator, batch: int = 2):
    levels = len(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    # An odd spatial size exercises the upsample-to-skip-size path when there are ≥ 2 levels.
    size = cfg.get("sample_size") or 2 ** (levels - 1) * 2
    size = size + 1 if levels > 1 else size
    frames = min(cfg.get("num_frames", 4), 5)
    ids = cfg.get("projection_class_embeddings_input_dim", 768) // cfg.get("addition_time_embed_dim", 256)
    ctx = cfg.get("cross_attention_dim", 1024)
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    return dict(
        sample=rng.standard_normal((batch, frames, cfg.get("in_channels", 8), size, size)),
        timestep=rng.uniform(-2.0, 2.0, batch),
        encoder_hidden_states=rng.standard_normal((batch, 3, ctx)),
        added_time_ids=rng.standard_normal((batch, ids)),
    )


def check_unet_against_diffusers(diffusers_config: dict, seed: int, attention=None) -> float:
    """Relative max error of our VideoUNet vs diffusers' UNetSpatioTemporalConditionModel.

    diffusers' `added_time_ids` path (sinusoid per id, flattened, `add_embedding`) is fed to our
    network as the label_emb input y = flatten(sinusoid(added_time_ids)). `attention`: an
    AttentionConfig for every attention of our network (default: the config's, `auto`).
    """
    return unet_errors_by_attention(diffusers_config, seed, {"": attention})[""]


def unet_errors_by_attention(diffusers_config: dict, seed: int, attentions: dict) -> dict[str, float]:
    """`check_unet_against_diffusers` for several attention configs ({label: AttentionConfig or
    None}) against one reference run: {label: relative max error}."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import UNetSpatioTemporalConditionModel
    from flax import nnx

    from keyface_jax.conversion.diffusers_unet import (diffusers_unet_state_dict_to_sgm,
                                                       unet_config_from_diffusers)
    from keyface_jax.conversion.nnx_torch import load_torch_state_dict
    from keyface_jax.models.layers import timestep_embedding
    from keyface_jax.models.unet import VideoUNet

    torch.manual_seed(seed)
    ref_model = UNetSpatioTemporalConditionModel(**diffusers_config).eval()
    randomize_torch_parameters(ref_model, seed)
    full_cfg = dict(ref_model.config)
    config = unet_config_from_diffusers(full_cfg)
    sgm_sd = diffusers_unet_state_dict_to_sgm(torch_state_dict_numpy(ref_model), config)
    inputs = {k: v.astype(np.float32) for k, v in _unet_inputs(full_cfg, np.random.default_rng(seed)).items()}
    with torch.no_grad():
        ref = ref_model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).sample.numpy()
    y = timestep_embedding(jnp.asarray(inputs["added_time_ids"]), full_cfg["addition_time_embed_dim"])
    args = (jnp.asarray(inputs["sample"].transpose(0, 1, 3, 4, 2)), jnp.asarray(inputs["timestep"]),
            jnp.asarray(inputs["encoder_hidden_states"]), y.reshape(y.shape[0], -1))

    errors = {}
    for label, attention in attentions.items():
        ours = config if attention is None else dataclasses.replace(config, attention=attention)
        graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoUNet(ours, rngs=nnx.Rngs(0))))
        state = load_torch_state_dict(state, sgm_sd)
        out = jax.jit(_apply_module, static_argnums=0)(graphdef, state, *args)
        errors[label] = relative_error(np.asarray(out).transpose(0, 1, 4, 2, 3), ref)
    return errors


def _apply_module(graphdef, state, *args):
    from flax import nnx

    return nnx.merge(graphdef, state)(*args)

