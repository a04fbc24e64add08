"""diffusers `UNetSpatioTemporalConditionModel` → sgm `VideoUNet` naming, and configs both ways.

Our VideoUNet mirrors sgm names, so importing diffusers weights is: rename diffusers keys to sgm
keys (this module), then the generic sgm → NNX loader. The map is derived from the config by
walking the block structure, so it holds for any channel/level/layer/head layout.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from keyface_jax.models.unet import UNetConfig

# Inner renames, applied to the part of a key after its block prefix (diffusers → sgm).
_RESNET = (
    ("spatial_res_block.norm1.", "in_layers.0."),
    ("spatial_res_block.conv1.", "in_layers.2."),
    ("spatial_res_block.time_emb_proj.", "emb_layers.1."),
    ("spatial_res_block.norm2.", "out_layers.0."),
    ("spatial_res_block.conv2.", "out_layers.3."),
    ("spatial_res_block.conv_shortcut.", "skip_connection."),
    ("temporal_res_block.norm1.", "time_stack.in_layers.0."),
    ("temporal_res_block.conv1.", "time_stack.in_layers.2."),
    ("temporal_res_block.time_emb_proj.", "time_stack.emb_layers.1."),
    ("temporal_res_block.norm2.", "time_stack.out_layers.0."),
    ("temporal_res_block.conv2.", "time_stack.out_layers.3."),
    ("time_mixer.", "time_mixer."),
)
_TRANSFORMER = (
    ("temporal_transformer_blocks.", "time_stack."),
    ("time_pos_embed.linear_1.", "time_pos_embed.0."),
    ("time_pos_embed.linear_2.", "time_pos_embed.2."),
    ("transformer_blocks.", "transformer_blocks."),
    ("norm.", "norm."), ("proj_in.", "proj_in."), ("proj_out.", "proj_out."),
    ("time_mixer.", "time_mixer."),
)
_PLAIN = (("", ""),)


def _per_level(value, n: int) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"diffusers config: {value!r} has {len(value)} entries for {n} levels")
        return tuple(value)
    return (value,) * n


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """Our UNetConfig for a diffusers UNetSpatioTemporalConditionModel config dict.

    The label_emb input is diffusers' sinusoidally embedded `added_time_ids`, flattened:
    `projection_class_embeddings_input_dim` wide.
    """
    down = tuple(cfg.get("down_block_types", ("CrossAttnDownBlockSpatioTemporal",) * 3
                         + ("DownBlockSpatioTemporal",)))
    up = tuple(cfg.get("up_block_types", ("UpBlockSpatioTemporal",)
                       + ("CrossAttnUpBlockSpatioTemporal",) * 3))
    chans = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(chans)
    if len(down) != n or len(up) != n:
        raise ValueError(f"diffusers config: {len(down)} down / {len(up)} up blocks for {n} channel levels")
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)) and any(isinstance(d, (list, tuple)) for d in depth):
        raise ValueError("diffusers config: per-layer transformer depths are not supported; "
                         "use one depth per level")
    heads = _per_level(cfg.get("num_attention_heads", (5, 10, 20, 20)), n)
    ctx = cfg.get("cross_attention_dim", 1024)
    ctx_levels = set(_per_level(ctx, n))
    if len(ctx_levels) != 1:
        raise ValueError(f"diffusers config: cross_attention_dim differs across levels ({ctx}); the "
                         "network takes one context")
    down_attn = tuple(t.startswith("CrossAttn") for t in down)
    up_attn = tuple(t.startswith("CrossAttn") for t in reversed(up))  # level order
    depth = _per_level(depth, n)
    return UNetConfig(
        in_channels=cfg.get("in_channels", 8),
        out_channels=cfg.get("out_channels", 4),
        block_out_channels=chans,
        layers_per_block=_per_level(cfg.get("layers_per_block", 2), n),
        down_attention=down_attn,
        up_attention=up_attn,
        num_heads=heads,
        transformer_depth=depth,
        mid_transformer_depth=depth[-1],
        mid_num_heads=heads[-1],
        context_dim=ctx_levels.pop(),
        adm_in_channels=cfg.get("projection_class_embeddings_input_dim", 768),
        # diffusers hard-codes these GroupNorm eps values per block type.
        down_resnet_eps=tuple(1e-6 if a else 1e-5 for a in down_attn),
        mid_resnet_eps=1e-5,
        up_resnet_eps=(1e-6,) * n,
        out_norm_eps=1e-5,
    )


def diffusers_config_from_unet(config: UNetConfig, addition_time_embed_dim: int = 256) -> dict:
    """A diffusers UNetSpatioTemporalConditionModel config with the same parameter tree as ours
    (for exporting to diffusers and for building test references). diffusers has one transformer
    depth and head count per level, and ties the middle block's to the last level's."""
    if config.mid_num_heads != config.num_heads[-1] or \
            config.mid_transformer_depth != config.transformer_depth[-1]:
        raise ValueError("UNetConfig: diffusers ties the middle block's heads/depth to the last level's")
    if config.adm_in_channels <= 0:
        raise ValueError("UNetConfig: diffusers' SVD UNet always has the label_emb (adm_in_channels > 0)")
    return dict(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple("CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal"
                               for a in config.down_attention),
        up_block_types=tuple("CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal"
                             for a in reversed(config.up_attention)),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=tuple(config.layers_per_block),
        transformer_layers_per_block=tuple(config.transformer_depth),
        num_attention_heads=tuple(config.num_heads),
        cross_attention_dim=config.context_dim,
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=config.adm_in_channels,
    )


def _block_prefixes(config: UNetConfig) -> Iterator[tuple[str, str, tuple]]:
    """(diffusers prefix, sgm prefix, inner rename table) for every block of the network."""
    yield "conv_in.", "input_blocks.0.0.", _PLAIN
    yield "time_embedding.linear_1.", "time_embed.0.", _PLAIN
    yield "time_embedding.linear_2.", "time_embed.2.", _PLAIN
    yield "add_embedding.linear_1.", "label_emb.0.0.", _PLAIN
    yield "add_embedding.linear_2.", "label_emb.0.2.", _PLAIN
    n = len(config.block_out_channels)
    index = 1
    for level in range(n):
        for j in range(config.layers_per_block[level]):
            yield f"down_blocks.{level}.resnets.{j}.", f"input_blocks.{index}.0.", _RESNET
            if config.down_attention[level]:
                yield f"down_blocks.{level}.attentions.{j}.", f"input_blocks.{index}.1.", _TRANSFORMER
            index += 1
        if level != n - 1:
            yield f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", _PLAIN
            index += 1
    yield "mid_block.resnets.0.", "middle_block.0.", _RESNET
    yield "mid_block.attentions.0.", "middle_block.1.", _TRANSFORMER
    yield "mid_block.resnets.1.", "middle_block.2.", _RESNET
    index = 0
    for u, level in enumerate(reversed(range(n))):
        count = config.layers_per_block[level] + 1
        for j in range(count):
            yield f"up_blocks.{u}.resnets.{j}.", f"output_blocks.{index}.0.", _RESNET
            if config.up_attention[level]:
                yield f"up_blocks.{u}.attentions.{j}.", f"output_blocks.{index}.1.", _TRANSFORMER
            if level and j == count - 1:
                slot = 2 if config.up_attention[level] else 1
                yield f"up_blocks.{u}.upsamplers.0.conv.", f"output_blocks.{index}.{slot}.conv.", _PLAIN
            index += 1
    yield "conv_norm_out.", "out.0.", _PLAIN
    yield "conv_out.", "out.2.", _PLAIN


def _rename(key: str, pairs) -> str:
    for d_prefix, s_prefix, table in pairs:
        if key.startswith(d_prefix):
            rest = key[len(d_prefix):]
            for d_in, s_in in table:
                if rest.startswith(d_in):
                    return s_prefix + s_in + rest[len(d_in):]
    raise KeyError(f"diffusers UNet key {key!r} has no counterpart for this config")


def _pairs(config: UNetConfig):
    # Longest prefixes first, so 'down_blocks.1.resnets.1.' never matches 'down_blocks.1.resnets.10.'.
    return sorted(_block_prefixes(config), key=lambda p: -len(p[0]))


def diffusers_unet_key_to_sgm(key: str, config: UNetConfig) -> str:
    return _rename(key, _pairs(config))


def diffusers_unet_state_dict_to_sgm(state_dict: dict[str, np.ndarray], config: UNetConfig
                                     ) -> dict[str, np.ndarray]:
    """Renames every key; the tensor layouts of the two namings are identical."""
    pairs = _pairs(config)
    return {_rename(k, pairs): v for k, v in state_dict.items()}
