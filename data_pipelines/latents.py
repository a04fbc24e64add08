"""The VAE image encoder for data preparation: weights, and one jitted fixed-size batch function.

Latents are what the reference precomputes (spec §3): frames in [-1, 1], a posterior *sample*
(or, as an option, the mode) × 0.18215. The sample noise of frame k of a video comes from
fold_in(fold_in(key(seed), video_id), k), so a latent depends only on (seed, video, frame): not
on the batch it was in, the host that made it, or whether the run was resumed.

Only the encoder (+ quant_conv) is materialised; the decoder is dropped before any weight is
made, so the SVD VAE costs its 34M encoder parameters, not 98M.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from keyface_jax.models.autoencoder import (AutoencoderKL, VAEConfig, posterior_mode,
                                            posterior_sample, to_diffusion_space)

_ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def video_id(name: str) -> int:
    """A stable 31-bit id of a video name (seeds its latent sampling noise)."""
    return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


def _random_value(path, shape, rng: np.random.Generator) -> np.ndarray:
    leaf = str(path[-1])
    if leaf == "kernel":  # N(0, 1/fan_in): activations stay O(1) through the stack
        return rng.standard_normal(shape).astype(np.float32) / np.sqrt(np.prod(shape[:-1]))
    if leaf == "scale":
        return np.ones(shape, np.float32)
    return np.zeros(shape, np.float32)


def _encoder_only(cfg: VAEConfig) -> AutoencoderKL:
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    model.decoder = None  # encode() never touches it
    return model


def random_encoder(cfg: VAEConfig, seed: int = 0) -> AutoencoderKL:
    """Encoder with seeded random weights (tests, smoke runs). Built abstractly and filled from
    numpy: eager NNX initialisation is slow on CPU."""
    model = _encoder_only(cfg)
    rng = np.random.default_rng(seed)
    flat = [(path, var.replace(jnp.asarray(_random_value(path, var.shape, rng), var.dtype)))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _read_weights(path: str) -> tuple[dict | None, dict]:
    """(diffusers config or None, state dict) from a diffusers VAE folder, an SVD pipeline folder
    (its vae/), or a single weights file (sgm or diffusers names, `first_stage_model.` ok)."""
    from keyface_jax.conversion.io import read_diffusers_folder, read_state_dict
    if os.path.isdir(path):
        sub = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
        return read_diffusers_folder(path, sub)
    sd = read_state_dict(path)
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return None, sd


def _is_orbax_export(path: str) -> bool:
    """An Orbax folder (ours: `keyface_jax.convert`, the autoencoder trainer's `export/`), as opposed
    to a diffusers folder, which has a config.json (in it or in its vae/)."""
    return (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))
            and not os.path.isdir(os.path.join(path, "vae"))
            and any(os.path.exists(os.path.join(path, m)) for m in ("_CHECKPOINT_METADATA", "_METADATA")))


def _load_orbax_encoder(path: str, cfg: VAEConfig) -> AutoencoderKL:
    """The encoder (+ quant_conv) of an Orbax export's "autoencoder" item, strictly checked
    against `cfg`'s architecture (the decoder weights are dropped)."""
    from keyface_jax.conversion.io import CheckpointError, restore_orbax
    from keyface_jax.conversion.keyface_ckpt import fill_from_pure_dict
    tree = restore_orbax(path).get("autoencoder")
    if not tree or "encoder" not in tree:
        raise CheckpointError(f"{path}: an Orbax export without autoencoder encoder weights")
    cfg = dataclasses.replace(cfg, use_quant_conv="quant_conv" in tree)
    model = _encoder_only(cfg)
    encoder_tree = {k: v for k, v in tree.items() if k != "decoder"}
    nnx.update(model, fill_from_pure_dict(model, encoder_tree, path, "autoencoder"))
    return model


def load_encoder(path: str, cfg: VAEConfig) -> AutoencoderKL:
    """Encoder weights from `path`: an Orbax export with an "autoencoder" item, or see
    `_read_weights`; `cfg` gives the architecture when the source has no diffusers config.json,
    and its dtype is kept."""
    from keyface_jax.conversion.diffusers_vae import (diffusers_vae_state_dict_to_sgm,
                                                      vae_config_from_diffusers)
    from keyface_jax.conversion.nnx_torch import load_torch_state_dict
    if _is_orbax_export(path):
        return _load_orbax_encoder(path, cfg)
    dcfg, sd = _read_weights(path)
    if dcfg is not None:
        cfg = vae_config_from_diffusers(dcfg, dtype=cfg.dtype)
    if any(k.startswith("encoder.down_blocks.") for k in sd):  # diffusers names
        sd = diffusers_vae_state_dict_to_sgm(sd, dcfg or {
            "block_out_channels": list(cfg.block_out_channels),
            "layers_per_block": cfg.layers_per_block, "latent_channels": cfg.latent_channels,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels})
    sd = {k: v for k, v in sd.items() if k.startswith(_ENCODER_PREFIXES)}
    if not any(k.startswith("encoder.") for k in sd):
        raise ValueError(f"{path}: no VAE encoder weights (KeyFace checkpoints hold only the "
                         "decoder: use the SVD VAE, e.g. stable-video-diffusion-img2vid/vae)")
    cfg = dataclasses.replace(cfg, use_quant_conv=any(k.startswith("quant_conv.") for k in sd))
    model = _encoder_only(cfg)
    load_torch_state_dict(model, sd)
    return model


class LatentEncoder:
    """uint8 frames [N, S, S, 3] → diffusion-space latents [N, S/8, S/8, C] (numpy float32).

    One jitted function of a fixed batch (the last batch is padded), so there is one compile;
    with several local devices the batch is split across them (weights replicated)."""

    def __init__(self, model: AutoencoderKL, *, batch_size: int = 8, mode: bool = False,
                 seed: int = 0):
        devices = jax.local_devices()
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.mode, self.seed = mode, seed
        self._graphdef, state = nnx.split(model)
        mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
        self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._batched = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        self._state = jax.device_put(state, self._replicated)

    def encode_batch(self, frames: np.ndarray, frame_indices: np.ndarray, vid: int) -> jax.Array:
        """Up to batch_size frames; returns a (not yet fetched) device array of len(frames)."""
        n = len(frames)
        if n > self.batch_size:
            raise ValueError(f"{n} frames > batch_size {self.batch_size}")
        pad = self.batch_size - n
        images = np.concatenate([frames, np.zeros((pad, *frames.shape[1:]), frames.dtype)])
        ids = np.concatenate([frame_indices, np.zeros(pad, frame_indices.dtype)]).astype(np.int32)
        images = jax.device_put(images, self._batched)
        ids = jax.device_put(ids, self._batched)
        out = _encode(self._graphdef, self._state, images, ids, np.int32(vid), np.int32(self.seed),
                      self.mode)
        return out[:n]

    def __call__(self, frames: np.ndarray, name: str, first_frame: int = 0) -> np.ndarray:
        """All frames of (part of) a video, in batches."""
        vid = video_id(name)
        outs = [self.encode_batch(frames[i:i + self.batch_size],
                                  np.arange(first_frame + i, first_frame + i +
                                            len(frames[i:i + self.batch_size])), vid)
                for i in range(0, len(frames), self.batch_size)]
        return np.concatenate([np.asarray(o) for o in outs]) if outs else None


@functools.partial(jax.jit, static_argnums=(0, 6))
def _encode(graphdef, state, images, frame_ids, vid, seed, mode: bool):
    model = nnx.merge(graphdef, state)
    x = images.astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = model.encode(x)
    if mode:
        latent = posterior_mode(mean, logvar)
    else:
        base = jax.random.fold_in(jax.random.key(seed), vid)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(frame_ids)
        latent = jax.vmap(posterior_sample)(mean, logvar, keys)
    return to_diffusion_space(latent)
