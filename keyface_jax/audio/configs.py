"""Encoder configs from the files users have: transformers `config.json`, and the `cfg` dicts of
Microsoft's original WavLM and BEATs checkpoints (unilm `WavLMConfig` / `BEATsConfig` keys, missing
keys at those classes' defaults), plus the input normalisation a checkpoint asks for."""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Mapping

from keyface_jax.audio.beats_model import BEATsConfig
from keyface_jax.audio.speech_model import SpeechConfig
from keyface_jax.audio.transformer import EncoderConfig

HF_MODEL_TYPES = ("wavlm", "wav2vec2")


def speech_config_from_hf(cfg: Mapping, source: str) -> SpeechConfig:
    """SpeechConfig from a transformers WavLMConfig / Wav2Vec2Config dict."""
    kind = cfg.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {kind!r} is not a JAX audio encoder here "
                         f"(supported: {HF_MODEL_TYPES}; use 'hubert_torch:' for others)")
    if cfg.get("add_adapter") or cfg.get("adapter_attn_dim"):
        raise ValueError(f"{source}: adapter layers (add_adapter/adapter_attn_dim) are not "
                         "supported by the JAX encoder")
    encoder = EncoderConfig(
        hidden_size=cfg.get("hidden_size", 768), num_layers=cfg.get("num_hidden_layers", 12),
        num_heads=cfg.get("num_attention_heads", 12),
        intermediate_size=cfg.get("intermediate_size", 3072),
        pos_conv_kernel=cfg.get("num_conv_pos_embeddings", 128),
        pos_conv_groups=cfg.get("num_conv_pos_embedding_groups", 16),
        layer_norm_first=bool(cfg.get("do_stable_layer_norm", False)),
        num_buckets=cfg.get("num_buckets", 320) if kind == "wavlm" else 0,
        max_distance=cfg.get("max_bucket_distance", 800), gated_bias=kind == "wavlm",
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), activation=cfg.get("hidden_act", "gelu"))
    return SpeechConfig(
        kind=kind, conv_dim=tuple(cfg.get("conv_dim", (512,) * 7)),
        conv_kernel=tuple(cfg.get("conv_kernel", (10, 3, 3, 3, 3, 2, 2))),
        conv_stride=tuple(cfg.get("conv_stride", (5, 2, 2, 2, 2, 2, 2))),
        conv_bias=bool(cfg.get("conv_bias", False)),
        feat_extract_norm=cfg.get("feat_extract_norm", "group"),
        feat_extract_activation=cfg.get("feat_extract_activation", "gelu"), encoder=encoder)


def fairseq_encoder_config(cfg: Mapping, source: str, *, beats: bool) -> EncoderConfig:
    """The transformer of an original WavLM / BEATs checkpoint (the same fairseq encoder; BEATs
    gates its relative bias from the projected queries and may use deep-norm residuals)."""
    get = cfg.get
    if get("activation_fn", "gelu") not in ("gelu", "relu"):
        raise ValueError(f"{source}: unsupported activation_fn {get('activation_fn')!r}")
    if get("layer_norm_first", False) and get("deep_norm", False):
        raise ValueError(f"{source}: deep_norm and layer_norm_first cannot both be set")
    layers = int(get("encoder_layers", 12))
    relative = bool(get("relative_position_embedding", False))
    return EncoderConfig(
        hidden_size=int(get("encoder_embed_dim", 768)), num_layers=layers,
        num_heads=int(get("encoder_attention_heads", 12)),
        intermediate_size=int(get("encoder_ffn_embed_dim", 3072)),
        pos_conv_kernel=int(get("conv_pos", 128)), pos_conv_groups=int(get("conv_pos_groups", 16)),
        layer_norm_first=bool(get("layer_norm_first", False)),
        num_buckets=int(get("num_buckets", 320)) if relative else 0,
        max_distance=int(get("max_distance", 1280)),
        gated_bias=relative and bool(get("gru_rel_pos", False)), gate_from_query=beats,
        residual_scale=(2 * layers) ** 0.25 if beats and get("deep_norm", False) else 1.0,
        activation=get("activation_fn", "gelu"))


def parse_conv_layers(spec: str, source: str) -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` string, e.g. "[(512,10,5)] + [(512,3,2)] * 4", read
    without eval: only list/tuple literals of integers joined by + and *."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = value(node.left), value(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"{source}: unsupported conv_feature_layers syntax: {ast.dump(node)}")

    try:
        layers = value(ast.parse(spec, mode="eval").body)
    except (SyntaxError, TypeError) as e:
        raise ValueError(f"{source}: cannot read conv_feature_layers {spec!r} ({e})") from None
    if not (isinstance(layers, list) and layers and all(
            isinstance(t, tuple) and len(t) == 3 for t in layers)):
        raise ValueError(f"{source}: conv_feature_layers {spec!r} is not a list of "
                         "(dim, kernel, stride)")
    return layers


def speech_config_from_wavlm_cfg(cfg: Mapping, source: str) -> SpeechConfig:
    """SpeechConfig from the `cfg` of an original WavLM checkpoint."""
    mode = cfg.get("extractor_mode", "default")
    if mode not in ("default", "layer_norm"):
        raise ValueError(f"{source}: unsupported extractor_mode {mode!r}")
    layers = parse_conv_layers(cfg.get("conv_feature_layers",
                                       "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"), source)
    return SpeechConfig(
        kind="wavlm", conv_dim=tuple(d for d, _, _ in layers),
        conv_kernel=tuple(k for _, k, _ in layers), conv_stride=tuple(s for _, _, s in layers),
        conv_bias=bool(cfg.get("conv_bias", False)),
        feat_extract_norm="group" if mode == "default" else "layer",
        encoder=fairseq_encoder_config(cfg, source, beats=False))


def beats_config_from_cfg(cfg: Mapping, source: str = "BEATs cfg") -> BEATsConfig:
    """BEATsConfig from the `cfg` of an original BEATs checkpoint."""
    patch = int(cfg.get("input_patch_size", -1))
    if patch <= 0:
        raise ValueError(f"{source}: input_patch_size must be positive, got {patch}")
    return BEATsConfig(patch_size=patch, embed_dim=int(cfg.get("embed_dim", 512)),
                       conv_bias=bool(cfg.get("conv_bias", False)),
                       encoder=fairseq_encoder_config(cfg, source, beats=True))


def preprocessor_normalize(folder: str) -> bool | None:
    """`do_normalize` of a transformers folder's preprocessor_config.json (None when absent)."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        value = json.load(f).get("do_normalize")
    return None if value is None else bool(value)
