"""Turns ml_collections configs (plain data) into the frozen dataclasses the models take."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax.numpy as jnp

from keyface_jax.models.attention_backends import AttentionConfig
from keyface_jax.models.autoencoder import VAEConfig
from keyface_jax.models.keyface import KeyFaceConfig
from keyface_jax.models.unet import UNetConfig


def _tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def network_config(model_cfg) -> KeyFaceConfig:
    """`config.model` → KeyFaceConfig, with errors that name the offending field."""
    unet = {k: _tuple(v) for k, v in dict(model_cfg.unet).items()}
    levels = len(unet["block_out_channels"])
    unet.setdefault("down_resnet_eps", (1e-5,) * levels)
    unet.setdefault("up_resnet_eps", (1e-5,) * levels)
    unet["remat"] = bool(model_cfg.get("remat", False))
    unet["remat_policy"] = model_cfg.get("remat_policy") or None
    unet["attention"] = attention_config(model_cfg, "config.model")
    try:
        unet_cfg = UNetConfig(**unet)
    except TypeError as e:
        raise ValueError(f"config.model.unet: {e}") from None
    return KeyFaceConfig(kind=model_cfg.kind, unet=unet_cfg, audio_dim=model_cfg.audio_dim,
                         audio_tokens_per_frame=model_cfg.audio_tokens_per_frame,
                         latent_channels=model_cfg.latent_channels, latent_size=model_cfg.latent_size)


def attention_config(section, where: str) -> AttentionConfig:
    """`attention` (+ `attention_min_seq_length`, `attention_chunk_size`) of a config section."""
    defaults = AttentionConfig()
    try:
        return AttentionConfig(
            backend=section.get("attention", defaults.backend),
            min_seq_length=int(section.get("attention_min_seq_length", defaults.min_seq_length)),
            chunk_size=int(section.get("attention_chunk_size", defaults.chunk_size)))
    except ValueError as e:
        raise ValueError(f"{where}.attention: {e}") from None


def dtypes(model_cfg):
    """(compute dtype, parameter dtype) of `config.model` as the model constructors take them: a
    float32 compute dtype is None, "compute in the inputs' dtype" (the layers then cast nothing;
    inputs and parameters are float32 already)."""
    compute = jnp.dtype(model_cfg.get("dtype", "float32"))
    return (None if compute == jnp.float32 else compute), jnp.dtype(model_cfg.get("param_dtype", "float32"))


def autoencoder_config(ae_cfg, *, use_encoder: bool = True, dtype=None) -> VAEConfig:
    """`config.autoencoder` → VAEConfig. Reference KeyFace checkpoints hold only the decoder:
    build those with use_encoder=False."""
    return VAEConfig(in_channels=ae_cfg.in_channels, out_channels=ae_cfg.out_channels,
                     block_out_channels=tuple(ae_cfg.block_out_channels),
                     layers_per_block=ae_cfg.layers_per_block, latent_channels=ae_cfg.latent_channels,
                     use_quant_conv=ae_cfg.use_quant_conv, use_encoder=use_encoder, dtype=dtype,
                     attention=attention_config(ae_cfg, "config.autoencoder"))


def load_config(spec: str):
    """'configs/keyframe.py:full' → the ConfigDict of that file's get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"config: no such file {path!r} (from {spec!r})")
    module_spec = importlib.util.spec_from_file_location("keyface_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
