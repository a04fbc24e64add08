"""Reference-format KeyFace checkpoints (spec §10) ↔ our networks, and initialisation from SVD.

A reference checkpoint is one state dict with these roots (after `_forward_module.` stripping):
  model.diffusion_model.*            the VideoUNet              → network `diffusion_model`
  conditioner.embedders.{3|1}.linear  the audio projection       → network `audio_proj`
  model.learned_mask [4, h, w]        interpolation mask token   → network `learned_mask` [h, w, 4]
  first_stage_model.{decoder,encoder}.*  the autoencoder        → an AutoencoderKL, if one is given
  loss_fn.lpips.*                     LPIPS-VGG of the pixel loss  (the only ignorable keys)
Accounting is strict: every other key must map and every target parameter must be filled.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Iterable, Mapping

import numpy as np
from flax import nnx

from keyface_jax.conversion.diffusers_unet import diffusers_unet_state_dict_to_sgm, unet_config_from_diffusers
from keyface_jax.conversion.diffusers_vae import diffusers_vae_state_dict_to_sgm
from keyface_jax.conversion.io import CheckpointError, read_diffusers_folder, read_state_dict
from keyface_jax.conversion.nnx_torch import export_torch_state_dict, load_torch_state_dict

IGNORABLE_KEYS = ("loss_fn.lpips.*",)
UNET_ROOT = "model.diffusion_model."
AE_ROOT = "first_stage_model."
MASK_KEY = "model.learned_mask"
AUDIO_ROOT = {"keyframe": "conditioner.embedders.3.linear.",
              "interpolation": "conditioner.embedders.1.linear."}
# Keys an SVD checkpoint has that a KeyFace network has no use for (SVD's CLIP image, fps,
# motion-bucket and cond-aug embedders; the denoiser's buffers).
SVD_UNUSED_KEYS = ("conditioner.*", "model.diffusion_model.label_emb.0.0.weight", "denoiser.*")
# Network parameters SVD has no weights for; they keep their fresh initialisation.
SVD_FRESH_KEYS = ("audio_proj.*", "learned_mask", "diffusion_model.label_emb.0.0.weight")


@dataclasses.dataclass
class ImportReport:
    network: nnx.State
    autoencoder: nnx.State | None
    ignored: list[str]             # keys dropped through an allow-list, for the log
    kept_initialisation: list[str]  # target keys left at their initial values (SVD init only)


def _kind(network) -> str:
    return network.config.kind


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _to_network_names(sd: Mapping[str, np.ndarray], kind: str, source: str, ignore: Iterable[str]):
    """Splits a reference state dict into (network sd in our names, autoencoder sd, ignored keys)."""
    ignore = tuple(ignore)
    audio = AUDIO_ROOT[kind]
    net, ae, ignored, unknown = {}, {}, [], []
    for key, value in sd.items():
        if key.startswith(UNET_ROOT) and not _matches(key, ignore):
            net["diffusion_model." + key[len(UNET_ROOT):]] = value
        elif key.startswith(audio) and not _matches(key, ignore):
            net["audio_proj." + key[len(audio):]] = value
        elif key == MASK_KEY and kind == "interpolation":
            net["learned_mask"] = np.moveaxis(np.asarray(value), 0, -1)  # [C,h,w] → [h,w,C]
        elif key.startswith(AE_ROOT) and not _matches(key, ignore):
            ae[key[len(AE_ROOT):]] = value
        elif _matches(key, ignore):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        listing = "\n  ".join(sorted(unknown)[:30])
        raise CheckpointError(f"{source}: {len(unknown)} keys belong to no part of a {kind} network "
                              f"and are not in the ignorable list {list(ignore)}:\n  {listing}")
    return net, ae, sorted(ignored)


def _load(target, sd, what: str, source: str):
    target_state = target if isinstance(target, nnx.State) else nnx.state(target, nnx.Param)
    try:
        return load_torch_state_dict(target_state, sd)
    except ValueError as e:
        raise CheckpointError(f"{source}: {what} weights do not fit the configured model: {e}") from None


def load_reference_checkpoint(path_or_state_dict, network, autoencoder=None, *,
                              ignore: Iterable[str] = IGNORABLE_KEYS) -> ImportReport:
    """Imports a reference KeyFace checkpoint (`.pt`/`.ckpt`/`.safetensors`, DeepSpeed or
    Lightning layout) into `network` (a KeyframeNet/InterpolationNet, possibly abstract) and, if
    the file carries autoencoder weights and `autoencoder` is given, into it (decoder-only files
    fill the decoder; pass `autoencoder.decoder` for those). Returns new States."""
    source, sd = _read(path_or_state_dict)
    net_sd, ae_sd, ignored = _to_network_names(sd, _kind(network), source, ignore)
    net_state = _load(network, net_sd, "network", source)
    ae_state = None
    if ae_sd and autoencoder is not None:
        if _is_decoder(autoencoder):
            ae_sd = _strip(ae_sd, "decoder.", source)
        ae_state = _load(autoencoder, ae_sd, "autoencoder", source)
    elif ae_sd:
        ignored.extend(AE_ROOT + k for k in sorted(ae_sd))  # the caller chose not to load the VAE
    return ImportReport(net_state, ae_state, ignored, [])


def _is_decoder(module) -> bool:
    return type(module).__name__ == "VideoDecoder"


def _strip(sd, prefix: str, source: str) -> dict:
    other = [k for k in sd if not k.startswith(prefix)]
    if other:
        raise CheckpointError(f"{source}: a decoder target was given but the file also holds "
                              f"{len(other)} non-decoder autoencoder keys, e.g. {other[:3]}; "
                              "pass the whole AutoencoderKL")
    return {k[len(prefix):]: v for k, v in sd.items()}


def _read(path_or_state_dict) -> tuple[str, Mapping[str, np.ndarray]]:
    if isinstance(path_or_state_dict, Mapping):
        return "<state dict>", path_or_state_dict
    return os.fspath(path_or_state_dict), read_state_dict(path_or_state_dict)


def export_reference_state_dict(network, autoencoder=None) -> dict[str, np.ndarray]:
    """Our network (and autoencoder) → a reference-named state dict (loadable back by
    `load_reference_checkpoint`, and by the reference after `torch.from_numpy`)."""
    kind = _kind(network)
    out = {}
    for key, value in export_torch_state_dict(network).items():
        if key.startswith("diffusion_model."):
            out[UNET_ROOT + key[len("diffusion_model."):]] = value
        elif key.startswith("audio_proj."):
            out[AUDIO_ROOT[kind] + key[len("audio_proj."):]] = value
        elif key == "learned_mask":
            out[MASK_KEY] = np.ascontiguousarray(np.moveaxis(value, -1, 0))
        else:
            raise AssertionError(f"network parameter {key!r} has no reference name")
    if autoencoder is not None:
        prefix = AE_ROOT + ("decoder." if _is_decoder(autoencoder) else "")
        out.update({prefix + k: v for k, v in export_torch_state_dict(autoencoder).items()})
    return out


def _read_svd(path) -> tuple[str, dict[str, np.ndarray]]:
    """An SVD checkpoint as a reference-named state dict: a single sgm-format file, or a diffusers
    pipeline folder (unet/ and vae/ subfolders), renamed to sgm keys."""
    src = os.fspath(path)
    if os.path.isdir(src) and os.path.isdir(os.path.join(src, "unet")):
        ucfg, usd = read_diffusers_folder(src, "unet")
        sd = {UNET_ROOT + k: v for k, v in
              diffusers_unet_state_dict_to_sgm(usd, unet_config_from_diffusers(ucfg)).items()}
        if os.path.isdir(os.path.join(src, "vae")):
            vcfg, vsd = read_diffusers_folder(src, "vae")
            sd.update({AE_ROOT + k: v for k, v in diffusers_vae_state_dict_to_sgm(vsd, vcfg).items()})
        return src, sd
    return src, read_state_dict(src)


def init_from_svd(network, path, autoencoder=None) -> ImportReport:
    """Initialises a *concrete* KeyFace network from SVD weights as the reference does: every UNet
    weight is reused except `label_emb.0.0.weight` (its input width changes) and, when the input
    channel count differs (interpolation: 9), `input_blocks.0.0.weight`; those, the audio
    projection and the learned mask keep their fresh initial values. Updates the modules in place."""
    source, sd = _read_svd(path)
    current = export_reference_state_dict(network)
    net_sd, ae_sd, ignored = _to_network_names(sd, _kind(network), source, SVD_UNUSED_KEYS)
    kept = []
    first_conv = "diffusion_model.input_blocks.0.0.weight"
    if first_conv in net_sd and net_sd[first_conv].shape[1] != network.config.unet.in_channels:
        del net_sd[first_conv]
        ignored.append(UNET_ROOT + "input_blocks.0.0.weight")
    may_keep = SVD_FRESH_KEYS + ((first_conv,) if first_conv not in net_sd else ())
    mine, _, _ = _to_network_names(current, _kind(network), "<network>", ())
    for key, value in mine.items():
        if key not in net_sd and _matches(key, may_keep):
            net_sd[key] = value
            kept.append(key)
    state = _load(network, net_sd, "network", source)
    nnx.update(network, state)
    ae_state = None
    if autoencoder is not None and ae_sd:
        ae_state = _load(autoencoder, ae_sd, "autoencoder", source)
        nnx.update(autoencoder, ae_state)
    return ImportReport(state, ae_state, sorted(ignored), sorted(kept))


def fill_from_pure_dict(module, values: Mapping, source: str, item: str) -> nnx.State:
    """The module's Param State with `values` (a nested dict of arrays), checked strictly."""
    state = nnx.state(module, nnx.Param)
    expected = {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}
    flat = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(prefix + (str(k),), v)
        else:
            flat[".".join(prefix)] = node
    walk((), values)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = [f"{k}: file {tuple(np.shape(flat[k]))}, model {expected[k]}"
             for k in sorted(set(flat) & set(expected)) if tuple(np.shape(flat[k])) != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{len(x)} {what}: {x[:10]}" for what, x in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong)) if x]
        raise CheckpointError(f"{source}: the '{item}' item does not fit the configured model; "
                              + "; ".join(parts))
    state.replace_by_pure_dict(values)
    return state


def load_orbax_export(path, network, autoencoder=None) -> ImportReport:
    """Reads an Orbax export of `keyface_jax.convert` ({"network", "autoencoder"} parameter trees)
    into `network` (and `autoencoder` when given and present), with strict key/shape checks."""
    from keyface_jax.conversion.io import restore_orbax

    source = os.fspath(path)
    restored = restore_orbax(source)
    if "network" not in restored and autoencoder is None:
        raise CheckpointError(f"{source}: an Orbax export without a 'network' item")
    net_state = (fill_from_pure_dict(network, restored["network"], source, "network")
                 if network is not None and "network" in restored else None)
    ae_state = None
    if autoencoder is not None:
        if "autoencoder" not in restored:
            raise CheckpointError(f"{source}: an Orbax export without an 'autoencoder' item")
        ae_state = fill_from_pure_dict(autoencoder, restored["autoencoder"], source, "autoencoder")
    return ImportReport(net_state, ae_state, [], [])
