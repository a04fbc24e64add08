"""Built-in log-mel features: numpy only, no weights, deterministic, 50 Hz (2 tokens per frame).

Token t (frame t // 2, half t % 2) is the spectrum of a 25 ms Hann window centred on the middle
of its 20 ms slot, i.e. at sample 320·t + 160; samples outside the fitted waveform are zeros, so a
window sees at most 40 samples (2.5 ms) of each neighbouring slot. Each token is

    [log-mel (n_mels) | Δ (n_mels) | ΔΔ (n_mels)]        (deltas=2, the default: 240 dims)

with log-mel = (ln(mel power + 1e-6) − LOG_OFFSET) / LOG_SCALE (fixed constants, no per-file
statistics, so features never depend on what else is in the file) and Δ the usual ±2-token
regression. `dim=` maps that vector through a fixed orthonormal projection (seeded Gaussian, QR
with positive-diagonal sign convention), which keeps distances and lets the features fill a
model's audio slot of any width (e.g. 768 to stand in for a 768-d encoder, or 32 for `tiny`).
"""

from __future__ import annotations

import functools

import numpy as np

from keyface_jax.audio.base import TokenExtractor
from keyface_jax.data.schema import AUDIO_RATE, SAMPLES_PER_FRAME, TOKENS_PER_FRAME

HOP = SAMPLES_PER_FRAME // TOKENS_PER_FRAME    # 320 samples = 20 ms per token
LOG_FLOOR = 1e-6
LOG_OFFSET = -7.0   # ≈ ln(mel power) of moderately loud speech in a quiet band
LOG_SCALE = 4.0


def hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float, fmax: float):
    """[n_fft//2+1, n_mels] HTK-style triangular filters, each normalised to unit area."""
    bins = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins[None] - lo) / (mid - lo)
    down = (hi - bins[None]) / (hi - mid)
    fb = np.maximum(0.0, np.minimum(up, down))
    area = fb.sum(axis=1, keepdims=True)
    if np.any(area == 0):
        raise ValueError(f"{n_mels} mel bands are too narrow for n_fft={n_fft}: some are empty")
    return (fb / area).T


def deltas(x: np.ndarray, width: int = 2) -> np.ndarray:
    """Regression deltas over ±width rows, edge rows repeated: [T, D] → [T, D]."""
    if x.shape[0] == 0:
        return x
    padded = np.pad(x, ((width, width), (0, 0)), mode="edge")
    t = x.shape[0]
    num = sum(k * (padded[width + k:width + k + t] - padded[width - k:width - k + t])
              for k in range(1, width + 1))
    return num / (2.0 * sum(k * k for k in range(1, width + 1)))


@functools.lru_cache(maxsize=16)
def fixed_projection(base_dim: int, dim: int, seed: int = 0) -> np.ndarray:
    """[base_dim, dim] with orthonormal columns (dim ≤ base) or rows (dim > base)."""
    rng = np.random.default_rng(seed)
    big, small = max(base_dim, dim), min(base_dim, dim)
    q, r = np.linalg.qr(rng.standard_normal((big, small)))
    q = q * np.sign(np.diag(r))[None]     # unique QR: LAPACK builds may flip column signs
    return (q if base_dim >= dim else q.T).astype(np.float64)


class LogMelExtractor(TokenExtractor):
    """Log-mel (+ deltas) features on the 50 Hz token grid; see the module docstring."""

    odd_rule = "resample"

    def __init__(self, n_mels: int = 80, num_deltas: int = 2, dim: int | None = None,
                 n_fft: int = 512, win_length: int = 400, fmin: float = 20.0,
                 fmax: float = 7600.0, projection_seed: int = 0):
        if num_deltas not in (0, 1, 2):
            raise ValueError(f"num_deltas must be 0, 1 or 2, got {num_deltas}")
        if win_length > n_fft or win_length % 2:
            raise ValueError(f"win_length must be even and ≤ n_fft, got {win_length}, {n_fft}")
        self.n_mels, self.num_deltas = n_mels, num_deltas
        self.n_fft, self.win_length = n_fft, win_length
        self.fmin, self.fmax, self.projection_seed = fmin, fmax, projection_seed
        self.base_dim = n_mels * (1 + num_deltas)
        self.dim = int(dim) if dim else self.base_dim
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.name = "logmel" if self.dim == self.base_dim else f"logmel{self.dim}"
        self._fb = mel_filterbank(n_mels, n_fft, AUDIO_RATE, fmin, fmax)
        self._window = np.hanning(win_length + 1)[:-1]   # periodic Hann

    def log_mel(self, waveform: np.ndarray, num_tokens: int) -> np.ndarray:
        """[num_tokens, n_mels] log-mel of the windows centred at 320·t + 160."""
        half = self.win_length // 2
        pad_left = max(0, half - HOP // 2)
        need = (num_tokens - 1) * HOP + HOP // 2 + half + pad_left
        wav = np.pad(waveform.astype(np.float64), (pad_left, max(0, need - waveform.shape[0])))
        starts = np.arange(num_tokens) * HOP + HOP // 2 - half + pad_left
        frames = wav[starts[:, None] + np.arange(self.win_length)[None]] * self._window
        power = np.abs(np.fft.rfft(frames, n=self.n_fft, axis=1)) ** 2
        return (np.log(power @ self._fb + LOG_FLOOR) - LOG_OFFSET) / LOG_SCALE

    def encode(self, waveform: np.ndarray, num_frames: int) -> np.ndarray:
        feats = [self.log_mel(waveform, TOKENS_PER_FRAME * num_frames)]
        for _ in range(self.num_deltas):
            feats.append(deltas(feats[-1]))
        out = np.concatenate(feats, axis=1)
        if self.dim != self.base_dim:
            out = out @ fixed_projection(self.base_dim, self.dim, self.projection_seed)
        return out.astype(np.float32)
