"""diffusers `AutoencoderKLTemporalDecoder` → sgm names for the SVD autoencoder.

Our NNX tree uses sgm's names (see `keyface_jax.models.autoencoder`); this module renames a
diffusers state dict into them and reshapes the attention projections, which diffusers
stores as Linear [C, C] and sgm as 1x1 Conv2d [C, C, 1, 1].

A key splits into a block prefix, renamed by a rule with index placeholders, and a remainder
`module.leaf` whose module part is renamed by the rule's table.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from keyface_jax.models.autoencoder import SCALE_FACTOR, VAEConfig

# diffusers AutoencoderKLTemporalDecoder.__init__ defaults, for keys a config dict leaves out.
_DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=(64,),
                           layers_per_block=1, latent_channels=4)

_PLAIN = {"": ""}  # a bare layer: the remainder is just `weight` / `bias`
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
           "conv_shortcut": "nin_shortcut"}
_VIDEO_RESNET = {
    **{f"spatial_res_block.{d}": s for d, s in _RESNET.items()},
    "temporal_res_block.norm1": "time_stack.in_layers.0",
    "temporal_res_block.conv1": "time_stack.in_layers.2",
    "temporal_res_block.norm2": "time_stack.out_layers.0",
    "temporal_res_block.conv2": "time_stack.out_layers.3",
    "time_mixer": "",  # time_mixer.mix_factor ↔ mix_factor
}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

# (diffusers prefix, sgm prefix, remainder table). Placeholders: {i}, {j} copied; {m} mid-block
# resnet k ↔ block_{k+1}; {u} diffusers up_blocks k ↔ sgm up.{n-1-k} (sgm indexes by resolution).
_RULES = [
    ("encoder.conv_in", "encoder.conv_in", _PLAIN),
    ("encoder.down_blocks.{i}.resnets.{j}", "encoder.down.{i}.block.{j}", _RESNET),
    ("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down.{i}.downsample.conv", _PLAIN),
    ("encoder.mid_block.resnets.{m}", "encoder.mid.block_{m}", _RESNET),
    ("encoder.mid_block.attentions.0", "encoder.mid.attn_1", _ATTN),
    ("encoder.conv_norm_out", "encoder.norm_out", _PLAIN),
    ("encoder.conv_out", "encoder.conv_out", _PLAIN),
    ("quant_conv", "quant_conv", _PLAIN),
    ("decoder.conv_in", "decoder.conv_in", _PLAIN),
    ("decoder.mid_block.resnets.{m}", "decoder.mid.block_{m}", _VIDEO_RESNET),
    ("decoder.mid_block.attentions.0", "decoder.mid.attn_1", _ATTN),
    ("decoder.up_blocks.{u}.resnets.{j}", "decoder.up.{u}.block.{j}", _VIDEO_RESNET),
    ("decoder.up_blocks.{u}.upsamplers.0.conv", "decoder.up.{u}.upsample.conv", _PLAIN),
    ("decoder.conv_norm_out", "decoder.norm_out", _PLAIN),
    ("decoder.conv_out", "decoder.conv_out", _PLAIN),
    ("decoder.time_conv_out", "decoder.conv_out.time_mix_conv", _PLAIN),
]

_ATTN_WEIGHT = re.compile(r"\.attn_1\.(q|k|v|proj_out)\.weight$")


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, name, literal, name, ...
    body = "".join(re.escape(p) if n % 2 == 0 else rf"(?P<{p}>\d+)" for n, p in enumerate(parts))
    return re.compile(rf"^{body}\.(?P<rest>.+)$")


_COMPILED = [(_pattern(d), s, table) for d, s, table in _RULES]


def _num_levels(config: Mapping[str, Any] | VAEConfig) -> int:
    if isinstance(config, VAEConfig):
        return len(config.block_out_channels)
    return len(config.get("block_out_channels", _DIFFUSERS_DEFAULTS["block_out_channels"]))


def _rename_rest(rest: str, table: Mapping[str, str]) -> str | None:
    module, _, leaf = rest.rpartition(".")
    if module not in table:
        return None
    return f"{table[module]}.{leaf}" if table[module] else leaf


def diffusers_vae_key_to_sgm(key: str, diffusers_config: Mapping[str, Any] | VAEConfig) -> str:
    """'decoder.up_blocks.0.resnets.1.temporal_res_block.norm1.weight' →
    'decoder.up.{n-1}.block.1.time_stack.in_layers.0.weight' (n = number of levels)."""
    n = _num_levels(diffusers_config)
    for pattern, template, table in _COMPILED:
        match = pattern.match(key)
        if match is None:
            continue
        rest = _rename_rest(match["rest"], table)
        if rest is None:
            continue
        idx = {}
        for name, value in match.groupdict().items():
            if name != "rest":
                v = int(value)
                idx[name] = n - 1 - v if name == "u" else v + (1 if name == "m" else 0)
        return f"{template.format(**idx)}.{rest}"
    raise KeyError(f"no diffusers → sgm rule for VAE key {key!r}")


def _check_decoder_mid(keys, prefix: str) -> None:
    """sgm's decoder mid block is always block_1, attn_1, block_2; diffusers' TemporalDecoder
    builds `layers_per_block` mid resnets (and skips the attention when that is 1)."""
    found = {int(m[1]) for k in keys if (m := re.match(rf"^{re.escape(prefix)}(\d+)\.", k))}
    if found and found != {0, 1}:
        raise ValueError(f"decoder mid block has resnets {sorted(found)}; the sgm VideoDecoder has "
                         "exactly two (diffusers only matches it when layers_per_block == 2)")


def diffusers_vae_state_dict_to_sgm(sd: Mapping[str, Any], diffusers_config) -> dict[str, np.ndarray]:
    """Renames a diffusers VAE state dict to sgm keys and reshapes attention Linear → 1x1 conv."""
    _check_decoder_mid(sd, "decoder.mid_block.resnets.")
    out = {}
    for key, value in sd.items():
        new_key, value = diffusers_vae_key_to_sgm(key, diffusers_config), np.asarray(value)
        if _ATTN_WEIGHT.search(new_key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[new_key] = value
    return out


def vae_config_from_diffusers(diffusers_config: Mapping[str, Any], **overrides) -> VAEConfig:
    """VAEConfig equivalent to an AutoencoderKLTemporalDecoder config (`overrides`: dtype, ...)."""
    cfg = {**_DIFFUSERS_DEFAULTS, **dict(diffusers_config)}
    n = len(cfg["block_out_channels"])
    types = cfg.get("down_block_types", ("DownEncoderBlock2D",) * n)
    if len(types) != n or any(t != "DownEncoderBlock2D" for t in types):
        raise ValueError(f"down_block_types {types} must be {n} x DownEncoderBlock2D")
    scaling = cfg.get("scaling_factor", SCALE_FACTOR)
    if abs(scaling - SCALE_FACTOR) > 1e-9:
        raise ValueError(f"scaling_factor {scaling} differs from SCALE_FACTOR {SCALE_FACTOR}")
    return VAEConfig(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                     block_out_channels=tuple(cfg["block_out_channels"]),
                     layers_per_block=cfg["layers_per_block"],
                     latent_channels=cfg["latent_channels"], use_quant_conv=True,
                     video_kernel_size=(3, 1, 1), **overrides)
