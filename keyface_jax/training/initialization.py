"""Initial weights of a training run: fresh (seeded), from SVD, from a reference KeyFace checkpoint
or from an Orbax export of ours; and the frozen VAE decoder of the pixel losses."""

from __future__ import annotations

import os

from flax import nnx

from keyface_jax.checkpoints import io, keyface_ckpt
from keyface_jax.checkpoints.nnx_torch import load_torch_state_dict
from keyface_jax.config_lib import autoencoder_config
from keyface_jax.models.autoencoder import AutoencoderKL
from keyface_jax.models.keyface import build_network

SOURCES = ("", "svd", "reference", "orbax")


def pretrained_network(init_cfg, net_cfg, abstract_network, seed: int, dtype=None):
    """The network with its initial weights on the host, or None for a fresh seeded init (which
    the trainer then runs on the devices, already sharded)."""
    source, path = init_cfg.source, init_cfg.path
    if source not in SOURCES:
        raise ValueError(f"config.init.source: {source!r}; choose one of {SOURCES}")
    if not source:
        return None
    if not path:
        raise ValueError(f"config.init.source={source!r} needs config.init.path")
    graphdef = nnx.split(abstract_network)[0]
    if source == "reference":
        report = keyface_ckpt.load_reference_checkpoint(path, abstract_network)
        return nnx.merge(graphdef, report.network)
    if source == "orbax":
        return nnx.merge(graphdef, keyface_ckpt.load_orbax_export(path, abstract_network).network)
    network = build_network(net_cfg, rngs=nnx.Rngs(seed), dtype=dtype)  # svd keeps some fresh values
    keyface_ckpt.init_from_svd(network, path)
    return network


def frozen_decoder(init_cfg, ae_cfg, dtype=None):
    """The temporal VAE decoder for the pixel losses, from `config.init.autoencoder`: an Orbax export
    of `keyface_jax.convert` (its "autoencoder" item) or a state-dict file of the autoencoder (sgm
    names, with or without the reference's `first_stage_model.` prefix)."""
    path = init_cfg.autoencoder
    if not path:
        raise ValueError("the pixel losses need the frozen VAE decoder: set config.init.autoencoder "
                         "to its weights, or objective.pixel_weight=0")
    vae_cfg = autoencoder_config(ae_cfg, use_encoder=False, dtype=dtype)
    model = nnx.eval_shape(lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)))
    decoder = model.decoder
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        restored = io.restore_orbax(path)
        if "decoder" not in restored.get("autoencoder", {}):
            raise io.CheckpointError(f"{path}: an Orbax export without autoencoder decoder weights")
        state = keyface_ckpt.fill_from_pure_dict(decoder, restored["autoencoder"]["decoder"], path,
                                                 "autoencoder.decoder")
        return nnx.merge(nnx.split(decoder)[0], state)
    sd = io.read_state_dict(path)
    prefix = "first_stage_model.decoder." if any(k.startswith("first_stage_model.") for k in sd) \
        else "decoder."
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise io.CheckpointError(f"{path}: no decoder weights (no keys under {prefix!r})")
    try:
        state = load_torch_state_dict(decoder, sd)
    except ValueError as e:
        raise io.CheckpointError(f"{path}: decoder weights do not fit config.autoencoder: {e}") from None
    return nnx.merge(nnx.split(decoder)[0], state)
