"""Procedural non-speech vocalisations (laughter, sighs) and a formant "babble" speech fallback.

All generators are numpy/scipy only, take a `np.random.Generator` and return float32 mono audio
at `rate` Hz with an RMS near `level` over their active part.

- laughter: a train of "ha" calls at 4–5.5 per second with growing gaps and decaying loudness;
  each call is an /h/ aspiration (noise) followed by a breathy, falling-pitch voiced vowel
  (sawtooth glottal source with pitch jitter, plus strong noise) through /a/ formant resonators.
- sigh: an optional quiet inhale, then a long exhale of formant-filtered noise with a slow attack,
  a long decay and weak voicing whose pitch falls — noisy, not harmonic, unlike speech.
- babble: syllables (noise onset + voiced vowel with moving formants, declining f0) grouped into
  words; used only when no recorded speech ships in the environment.
"""

from __future__ import annotations

import numpy as np
from scipy import signal

VOWELS = {  # first three formant frequencies (Hz), adult female-ish
    "a": (850, 1220, 2810), "e": (560, 2320, 2950), "i": (310, 2790, 3310),
    "o": (560, 920, 2830), "u": (370, 950, 2670), "@": (600, 1550, 2700),
}


def _formant_filter(x: np.ndarray, formants, rate: int, bandwidths=(90, 110, 170),
                    gains=(1.0, 0.5, 0.25)) -> np.ndarray:
    """Parallel second-order resonators, one per formant."""
    out = np.zeros_like(x)
    for f, bw, g in zip(formants, bandwidths, gains):
        b, a = signal.iirpeak(f, f / bw, fs=rate)
        out += g * signal.lfilter(b, a, x)
    return out


def _glottal(f0: np.ndarray, rate: int) -> np.ndarray:
    """Band-limited sawtooth-like pulse train following an f0 contour (Hz per sample)."""
    phase = 2 * np.pi * np.cumsum(f0) / rate
    out = np.zeros_like(f0)
    for k in range(1, 16):
        alias = (k * f0 < 0.45 * rate).astype(np.float64)
        out += alias * np.sin(k * phase) / k ** 1.2
    return out


def _normalise(x: np.ndarray, level: float) -> np.ndarray:
    active = np.abs(x) > 0.05 * np.abs(x).max() if np.any(x) else np.ones_like(x, bool)
    rms = np.sqrt(np.mean(x[active] ** 2)) if np.any(active) else 1.0
    return (x * (level / max(rms, 1e-9))).astype(np.float32)


def _ramp(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    a, r = min(attack, n), min(release, n)
    env[:a] *= 0.5 - 0.5 * np.cos(np.pi * np.arange(a) / max(a, 1))
    env[n - r:] *= 0.5 + 0.5 * np.cos(np.pi * np.arange(r) / max(r, 1))
    return env


def laughter(seconds: float, rng: np.random.Generator, rate: int = 16000,
             f0: float = 230.0, level: float = 0.07) -> np.ndarray:
    n = int(round(seconds * rate))
    out = np.zeros(n)
    burst_rate = rng.uniform(4.0, 5.5)
    t, i = rng.uniform(0.0, 0.05), 0
    while t < seconds - 0.08:
        amp = np.exp(-0.18 * i) * rng.uniform(0.8, 1.0)
        asp = int(rate * rng.uniform(0.02, 0.04))
        voiced = int(rate * rng.uniform(0.07, 0.11))
        start = int(t * rate)
        length = min(asp + voiced, n - start)
        if length <= 0:
            break
        noise = rng.standard_normal(asp + voiced)
        pitch = f0 * rng.uniform(0.92, 1.15) * (1 - 0.04 * i)
        contour = np.concatenate([np.full(asp, pitch),
                                  np.linspace(pitch, 0.75 * pitch, voiced)])
        contour *= 1 + 0.03 * rng.standard_normal(contour.size).cumsum() / np.sqrt(contour.size)
        source = _glottal(contour, rate)
        voicing = np.concatenate([np.zeros(asp), _ramp(voiced, voiced // 5, voiced // 2)])
        breath = np.concatenate([1.5 * _ramp(asp, asp // 3, asp // 4),
                                 0.8 * _ramp(voiced, voiced // 5, voiced // 2)])
        call = _formant_filter(voicing * source + breath * noise, VOWELS["a"], rate)
        out[start:start + length] += amp * call[:length]
        t += (1.0 + 0.06 * i) / burst_rate
        i += 1
    return _normalise(out, level)


def sigh(seconds: float, rng: np.random.Generator, rate: int = 16000,
         f0: float = 200.0, level: float = 0.025) -> np.ndarray:
    n = int(round(seconds * rate))
    inhale = int(n * rng.uniform(0.15, 0.3)) if rng.random() < 0.6 else 0
    exhale = n - inhale
    out = np.zeros(n)
    if inhale:
        # a quiet intake of breath: high, unvoiced, a third of the exhale's level
        noise = signal.lfilter(*signal.butter(2, [1500, 6000], "bandpass", fs=rate),
                               rng.standard_normal(inhale))
        out[:inhale] = 0.3 * noise / noise.std() * _ramp(inhale, inhale // 2, inhale // 3)
    t = np.arange(exhale) / rate
    env = (1 - np.exp(-t / 0.12)) * np.exp(-t / (0.45 * exhale / rate + 1e-3))
    breath = _formant_filter(rng.standard_normal(exhale), VOWELS["@"], rate,
                             bandwidths=(200, 250, 300))
    breath /= breath.std() * 0.55          # the exhale peaks at about unit RMS (env max ≈ 0.55)
    contour = np.linspace(f0, 0.65 * f0, exhale)
    voice = _formant_filter(_glottal(contour, rate), VOWELS["@"], rate) * np.exp(-t / 0.25)
    out[inhale:] = env * (breath + 0.25 * voice / (np.abs(voice).max() + 1e-9)
                          * np.abs(breath).max())
    out *= _ramp(n, int(0.01 * rate), int(0.05 * rate))
    return _normalise(out, level)


def babble(seconds: float, rng: np.random.Generator, rate: int = 16000,
           f0: float = 210.0, level: float = 0.05) -> np.ndarray:
    """Speech-like formant babble: words of 1–4 syllables at about 4 syllables/s, short pauses."""
    n = int(round(seconds * rate))
    out = np.zeros(n)
    t = 0.0
    names = list(VOWELS)
    while t < seconds:
        for _ in range(rng.integers(1, 5)):
            dur = rng.uniform(0.16, 0.3)
            m = int(dur * rate)
            start = int(t * rate)
            if start + m > n:
                break
            onset = int(m * rng.uniform(0.1, 0.3))
            f = f0 * (1 - 0.15 * t / max(seconds, 1e-3)) * rng.uniform(0.9, 1.15)
            contour = f * (1 + 0.08 * np.sin(np.linspace(0, np.pi, m)))
            v1, v2 = (VOWELS[names[k]] for k in rng.integers(0, len(names), 2))
            glide = np.linspace(0, 1, m)[:, None]
            formants = (1 - glide) * np.array(v1) + glide * np.array(v2)
            src = _glottal(contour, rate) * np.concatenate(
                [np.zeros(onset), _ramp(m - onset, (m - onset) // 4, (m - onset) // 3)])
            src += 0.6 * rng.standard_normal(m) * np.concatenate(
                [_ramp(onset, 1, onset // 2), np.zeros(m - onset)])
            # formants glide within the syllable: filter in 4 pieces with their mean targets
            syl = np.zeros(m)
            for piece in np.array_split(np.arange(m), 4):
                syl[piece] = _formant_filter(src, formants[piece].mean(axis=0), rate)[piece]
            out[start:start + m] += syl * rng.uniform(0.6, 1.0)
            t += dur
        t += rng.uniform(0.08, 0.35)
    return _normalise(out, level)
