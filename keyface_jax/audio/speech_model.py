"""WavLM and wav2vec2 in Flax NNX: raw 16 kHz waveform → last hidden state (50 Hz tokens).

    waveform [B, N] → conv feature encoder (7 strided Conv1d + GELU; GroupNorm over time on the
    first layer ("group", Base models) or LayerNorm on every layer ("layer", Large models))
    → LayerNorm → Linear → transformer encoder (`keyface_jax.audio.transformer`) → [B, L, D]

with L = the conv stack's output length (49 tokens per second, 2F − 1 for F video frames).
Batches are padded: `lengths` [B] gives each waveform's valid samples. The first layer's
GroupNorm statistics are taken over valid frames only and the transformer masks padded tokens,
so each item's valid tokens equal what the unpadded waveform gives.

Attribute names mirror transformers' `WavLMModel` / `Wav2Vec2Model`. Input normalisation
(wav2vec2's whole-file standardisation, WavLM's `normalize` layer norm) is a property of the
checkpoint, not of the module: it happens on the host, before padding
(`keyface_jax.audio.jax_encoders`); WavLM-Large and wav2vec2-base ask for it, WavLM-Base+ not.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from keyface_jax.audio.transformer import ACTIVATIONS, EncoderConfig, TransformerEncoder
from keyface_jax.models.layers import GroupNorm, LayerNorm, Linear, logical_param

CONV_DIM = (512,) * 7
CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)


@dataclasses.dataclass(frozen=True)
class SpeechConfig:
    kind: str = "wavlm"                     # "wavlm" or "wav2vec2" (naming and defaults only)
    conv_dim: tuple[int, ...] = CONV_DIM
    conv_kernel: tuple[int, ...] = CONV_KERNEL
    conv_stride: tuple[int, ...] = CONV_STRIDE
    conv_bias: bool = False
    feat_extract_norm: str = "group"        # "group" (first layer, over time) or "layer" (all)
    feat_extract_activation: str = "gelu"
    encoder: EncoderConfig = EncoderConfig()

    def __post_init__(self):
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            raise ValueError(f"conv_dim/conv_kernel/conv_stride lengths differ: {self.conv_dim}, "
                             f"{self.conv_kernel}, {self.conv_stride}")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(f"feat_extract_norm must be 'group' or 'layer', "
                             f"got {self.feat_extract_norm!r}")
        if self.feat_extract_activation not in ACTIVATIONS:
            raise ValueError(f"unsupported feat_extract_activation "
                             f"{self.feat_extract_activation!r}")

    @property
    def dim(self) -> int:
        return self.encoder.hidden_size

    def output_length(self, num_samples: int) -> int:
        """Tokens the conv stack gives for `num_samples`; 0 when too short."""
        n = int(num_samples)
        for k, s in zip(self.conv_kernel, self.conv_stride):
            n = max((n - k) // s + 1, 0)
        return n

    @property
    def min_samples(self) -> int:
        """The shortest waveform that gives one token (400 for the standard stack)."""
        n = 1
        for k, s in reversed(list(zip(self.conv_kernel, self.conv_stride))):
            n = (n - 1) * s + k
        return n


def _base(kind, **kw):
    return SpeechConfig(kind=kind, **kw)


WAVLM_BASE = _base("wavlm", encoder=EncoderConfig(num_buckets=320, max_distance=800,
                                                  gated_bias=True))
WAVLM_BASE_PLUS = WAVLM_BASE        # same architecture, more pre-training data
WAVLM_LARGE = _base("wavlm", feat_extract_norm="layer", encoder=EncoderConfig(
    hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, layer_norm_first=True,
    num_buckets=320, max_distance=800, gated_bias=True))
WAV2VEC2_BASE = _base("wav2vec2")
PRESETS = {"wavlm-base": WAVLM_BASE, "wavlm-base-plus": WAVLM_BASE_PLUS,
           "wavlm-large": WAVLM_LARGE, "wav2vec2-base": WAV2VEC2_BASE}


class ConvLayer(nnx.Module):
    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, bias: bool,
                 norm: str | None):
        self.stride = stride
        self.conv = _Conv1d(n_in, n_out, kernel, bias)
        if norm == "group":     # one group per channel: each channel normalised over time
            self.layer_norm = GroupNorm(n_out, num_groups=n_out)
        elif norm == "layer":
            self.layer_norm = LayerNorm(n_out)
        else:
            self.layer_norm = None
        self.norm = norm

    def __call__(self, x, valid, activation):
        """x [B, T, C_in], valid [B, T'] bool (output frames) → [B, T', C_out]."""
        y = self.conv(x, self.stride)
        if self.norm == "group":
            y = _masked_instance_norm(y, valid, self.layer_norm)
        elif self.norm == "layer":
            y = self.layer_norm(y)
        return activation(y)


class _Conv1d(nnx.Module):
    def __init__(self, n_in: int, n_out: int, kernel: int, bias: bool):
        self.kernel = logical_param(None, nnx.initializers.zeros, (kernel, n_in, n_out),
                                    jnp.float32, (None, None, None))
        self.bias = (logical_param(None, nnx.initializers.zeros, (n_out,), jnp.float32, (None,))
                     if bias else None)

    def __call__(self, x, stride: int):
        y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), (stride,), "VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


def _masked_instance_norm(y, valid, norm: GroupNorm):
    """torch GroupNorm(C, C) over time, statistics over the valid frames only (float32).

    The sums over time are matrix-vector products with the mask: XLA:CPU reduces over a
    non-minor axis ~8x slower than it runs the GEMV (two-pass mean/variance, as torch)."""
    yf = y.astype(jnp.float32)
    m = valid.astype(jnp.float32)                                         # [B, T]
    count = jnp.maximum(m.sum(1), 1.0)[:, None, None]
    total = lambda t: jnp.einsum("bt,btc->bc", m, t, precision=jax.lax.Precision.HIGHEST)[:, None]
    centred = yf - total(yf) / count
    var = total(jnp.square(centred)) / count
    out = centred * jax.lax.rsqrt(var + norm.eps)
    return (out * norm.scale[...] + norm.bias[...]).astype(y.dtype)


class FeatureEncoder(nnx.Module):
    def __init__(self, cfg: SpeechConfig):
        self.cfg = cfg
        dims = (1,) + tuple(cfg.conv_dim)
        norms = [("group" if i == 0 else None) if cfg.feat_extract_norm == "group" else "layer"
                 for i in range(len(cfg.conv_dim))]
        self.conv_layers = nnx.List([
            ConvLayer(dims[i], dims[i + 1], cfg.conv_kernel[i], cfg.conv_stride[i], cfg.conv_bias,
                      norms[i]) for i in range(len(cfg.conv_dim))])

    def __call__(self, wave, lengths):
        """wave [B, N], lengths [B] → features [B, L, C], valid [B, L] bool."""
        x, n = wave[..., None], lengths
        act = ACTIVATIONS[self.cfg.feat_extract_activation]
        for layer, k, s in zip(self.conv_layers, self.cfg.conv_kernel, self.cfg.conv_stride):
            n = jnp.maximum((n - k) // s + 1, 0)
            t = (x.shape[1] - k) // s + 1
            valid = jnp.arange(t)[None] < n[:, None]
            x = layer(x, valid, act)
        return x, valid


class FeatureProjection(nnx.Module):
    def __init__(self, cfg: SpeechConfig, dtype=None):
        eps = cfg.encoder.layer_norm_eps
        self.layer_norm = LayerNorm(cfg.conv_dim[-1], eps=eps, dtype=dtype)
        self.projection = Linear(cfg.conv_dim[-1], cfg.dim, rngs=None, axes=(None, None),
                                 zero_init=True, dtype=dtype)

    def __call__(self, x):
        return self.projection(self.layer_norm(x))


class SpeechEncoder(nnx.Module):
    """WavLM / wav2vec2 base model: (wave [B, N], lengths [B]) → ([B, L, D], valid [B, L])."""

    def __init__(self, cfg: SpeechConfig, dtype=None):
        self.cfg, self.dtype = cfg, dtype
        self.feature_extractor = FeatureEncoder(cfg)
        self.feature_projection = FeatureProjection(cfg, dtype)
        self.encoder = TransformerEncoder(cfg.encoder, dtype)

    def __call__(self, wave, lengths):
        feats, valid = self.feature_extractor(wave.astype(self.dtype or wave.dtype), lengths)
        return self.encoder(self.feature_projection(feats), valid), valid


def abstract_speech_encoder(cfg: SpeechConfig, dtype=None) -> SpeechEncoder:
    """The module with abstract (shape-only) parameters, to fill from a checkpoint."""
    return nnx.eval_shape(lambda: SpeechEncoder(cfg, dtype))
