"""BEATs (microsoft/unilm) in Flax NNX: 16 kHz waveform → encoder embeddings of 16×16 fbank patches.

    waveform [B, N] ·2^15 → Kaldi fbank [B, m, 128] (`keyface_jax.audio.fbank`)
    → (fbank − 15.41663) / (2·6.55582)
    → 16×16 patches, stride 16 (Conv2d 1 → 512, no bias): [B, m // 16, 8, 512], flattened
      time-major (8 frequency patches per 160 ms time patch) → [B, 8·(m // 16), 512]
    → LayerNorm → Linear 512 → 768 → transformer encoder → [B, P, 768]

The encoder is WavLM's design with BEATs' switches (`EncoderConfig`: gate from the projected
queries, deep-norm residual scale (2·layers)^¼, relative bias shared by all layers). The
fine-tuned checkpoints' AudioSet classifier (`predictor`) is not built: KeyFace uses the
embeddings. Padded batches: `lengths` [B] masks the patches past each item's own fbank frames.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from keyface_jax.audio.fbank import kaldi_fbank, num_frames
from keyface_jax.audio.transformer import EncoderConfig, TransformerEncoder
from keyface_jax.models.layers import LayerNorm, Linear, logical_param

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
WAVE_SCALE = 2.0 ** 15


@dataclasses.dataclass(frozen=True)
class BEATsConfig:
    patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    num_mel_bins: int = 128
    fbank_mean: float = FBANK_MEAN
    fbank_std: float = FBANK_STD
    encoder: EncoderConfig = EncoderConfig(
        num_buckets=320, max_distance=800, gated_bias=True, gate_from_query=True,
        residual_scale=(2 * 12) ** 0.25)

    def __post_init__(self):
        if self.num_mel_bins % self.patch_size:
            raise ValueError(f"{self.num_mel_bins} mel bins do not split into "
                             f"{self.patch_size}-bin patches")

    @property
    def dim(self) -> int:
        return self.encoder.hidden_size

    @property
    def freq_patches(self) -> int:
        return self.num_mel_bins // self.patch_size

    def output_length(self, num_samples: int) -> int:
        """Patches (tokens) for `num_samples`: 8 per whole 16-frame time patch."""
        return (num_frames(int(num_samples)) // self.patch_size) * self.freq_patches

    @property
    def min_samples(self) -> int:
        """The shortest waveform that gives one time patch (2800 samples, 175 ms)."""
        return 400 + (self.patch_size - 1) * 160


BEATS_ITER3_PLUS = BEATsConfig()    # BEATs_iter3+ (AS2M, also its fine-tuned cpt2)


class BEATs(nnx.Module):
    """(wave [B, N], lengths [B]) → ([B, P, D], valid [B, P]); P = 8·(frames // 16)."""

    def __init__(self, cfg: BEATsConfig, dtype=None):
        self.cfg = cfg
        p = cfg.patch_size
        self.patch_embedding = _PatchEmbedding(p, cfg.embed_dim, cfg.conv_bias)
        self.layer_norm = LayerNorm(cfg.embed_dim, dtype=dtype)
        self.post_extract_proj = (
            Linear(cfg.embed_dim, cfg.dim, rngs=None, axes=(None, None), zero_init=True,
                   dtype=dtype) if cfg.embed_dim != cfg.dim else None)
        self.encoder = TransformerEncoder(cfg.encoder, dtype)
        self.dtype = dtype

    def patches(self, wave):
        """Normalised fbank patches [B, T, F, p·p] (time-major), in (time, freq) pixel order."""
        cfg, p = self.cfg, self.cfg.patch_size
        fbank = kaldi_fbank(wave * WAVE_SCALE, cfg.num_mel_bins)
        fbank = (fbank - cfg.fbank_mean) / (2 * cfg.fbank_std)
        b, m, f = fbank.shape
        t = m // p
        x = fbank[:, :t * p].reshape(b, t, p, f // p, p)
        return x.transpose(0, 1, 3, 2, 4).reshape(b, t, f // p, p * p)

    def __call__(self, wave, lengths):
        cfg = self.cfg
        x = self.patches(wave)
        b, t, f, _ = x.shape
        x = self.patch_embedding(x.astype(self.dtype or x.dtype)).reshape(b, t * f, cfg.embed_dim)
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        frames = jnp.where(lengths >= 400, 1 + (lengths - 400) // 160, 0)
        valid = jnp.arange(t * f)[None] < ((frames // cfg.patch_size) * f)[:, None]
        return self.encoder(x, valid), valid


class _PatchEmbedding(nnx.Module):
    """torch Conv2d(1, D, p, stride=p) on [B, 1, time, freq]; kernel stored HWIO [p, p, 1, D]."""

    def __init__(self, patch: int, dim: int, bias: bool):
        self.kernel = logical_param(None, nnx.initializers.zeros, (patch, patch, 1, dim),
                                    jnp.float32, (None, None, None, None))
        self.bias = (logical_param(None, nnx.initializers.zeros, (dim,), jnp.float32, (None,))
                     if bias else None)

    def __call__(self, patches):
        w = self.kernel[...].astype(patches.dtype)
        y = jnp.einsum("btfk,kd->btfd", patches, w.reshape(-1, w.shape[-1]))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


def abstract_beats(cfg: BEATsConfig, dtype=None) -> BEATs:
    return nnx.eval_shape(lambda: BEATs(cfg, dtype))
