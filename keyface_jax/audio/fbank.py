"""Kaldi-compatible log-mel filter bank in JAX (`torchaudio.compliance.kaldi.fbank`, its defaults).

BEATs' front end (spec §2.3) calls it with num_mel_bins=128, frame_length=25 ms, frame_shift=10 ms
at 16 kHz on the waveform·2^15. With Kaldi's other defaults (no dither, snip_edges):

    frames     m = 1 + (N − 400) // 160 windows of 400 samples, hop 160 (none when N < 400)
    per frame  remove the DC offset → pre-emphasis x[i] − 0.97·x[i−1] (x[−1] := x[0])
               → Povey window (Hann, symmetric, ^0.85) → zero-pad to 512 → |rfft|²
    mel        128 triangular filters, equally spaced on 1127·ln(1 + f/700) between 20 Hz and
               8 kHz, over the 256 lowest FFT bins (the Nyquist bin gets no weight)
    output     ln(max(mel energy, float32 eps))   [B, m, 128]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16_000
WINDOW = 400          # 25 ms
HOP = 160             # 10 ms
FFT_SIZE = 512        # the window rounded up to a power of two
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
EPSILON = float(np.finfo(np.float32).eps)


def num_frames(num_samples: int) -> int:
    """Kaldi frames (snip_edges) of a waveform of `num_samples`."""
    return 0 if num_samples < WINDOW else 1 + (num_samples - WINDOW) // HOP


@functools.lru_cache(maxsize=8)
def povey_window() -> np.ndarray:
    n = np.arange(WINDOW)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / (WINDOW - 1))
    return (hann ** 0.85).astype(np.float32)


def _mel(freq):
    return 1127.0 * np.log(1.0 + np.asarray(freq, np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int, fft_size: int = FFT_SIZE, sample_rate: int = SAMPLE_RATE,
                    low_freq: float = LOW_FREQ, high_freq: float = 0.0) -> np.ndarray:
    """[fft_size // 2 + 1, num_bins] filter weights (last row, Nyquist, zero), float32."""
    nyquist = 0.5 * sample_rate
    high = high_freq + nyquist if high_freq <= 0 else high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"bad mel range [{low_freq}, {high}] Hz at {sample_rate} Hz")
    lo, hi = _mel(low_freq), _mel(high)
    delta = (hi - lo) / (num_bins + 1)
    b = np.arange(num_bins)[:, None]
    left, centre, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
    mel = _mel(sample_rate / fft_size * np.arange(fft_size // 2))[None]
    weights = np.maximum(0.0, np.minimum((mel - left) / (centre - left),
                                         (right - mel) / (right - centre)))
    return np.concatenate([weights.T, np.zeros((1, num_bins))]).astype(np.float32)


def kaldi_fbank(wave: jax.Array, num_mel_bins: int = 128) -> jax.Array:
    """wave [B, N] (already scaled, e.g. ×2^15) → log mel energies [B, num_frames(N), bins]."""
    m = num_frames(wave.shape[-1])
    if m == 0:
        return jnp.zeros((*wave.shape[:-1], 0, num_mel_bins), jnp.float32)
    wave = wave.astype(jnp.float32)
    idx = np.arange(m)[:, None] * HOP + np.arange(WINDOW)[None]
    frames = wave[..., idx]                                        # [B, m, 400]
    frames = frames - frames.mean(-1, keepdims=True)
    previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = (frames - PREEMPHASIS * previous) * povey_window()
    spectrum = jnp.fft.rfft(frames, n=FFT_SIZE, axis=-1)
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    energies = jnp.matmul(power, jnp.asarray(kaldi_mel_banks(num_mel_bins)),
                          precision=jax.lax.Precision.HIGHEST)
    return jnp.log(jnp.maximum(energies, EPSILON))


def samples_for_frames(frames: int) -> int:
    """The fewest samples that give `frames` Kaldi frames."""
    return WINDOW + (frames - 1) * HOP if frames > 0 else 0

