"""The audio-feature protocol: 16 kHz mono waveform → exactly 2 tokens per 25 fps video frame.

Alignment rules, shared by every extractor (spec §2.3, `scripts/util/audio_wrapper.py`):

1. The waveform is fitted to exactly `num_frames · 640` samples: zero-padded at the end when short,
   trimmed at the end when long. Frame f then owns samples [640·f, 640·(f+1)), and its two tokens
   describe the two 20 ms halves of that span (for 50 Hz encoders) — no look-ahead across frames
   beyond each encoder's own receptive field.
2. An encoder returns L tokens for that span. `align_tokens` turns them into exactly 2·F:
   - `odd_rule="zero_pad"` (reference wav2vec2/HuBERT): when L == 2F − 1 — what a 50 Hz conv stack
     (stride 320, receptive field 400) gives for 640·F samples — one zero token is appended, as
     the reference does. Any other L is nearest-resampled (the reference would reshape a wrong
     count and fail or drift; we keep the frame ↔ token pairing exact instead).
   - `odd_rule="resample"` (reference WavLM, BEATs): nearest-resample L → 2F, index
     ⌊i·L / 2F⌋ (torch `F.interpolate(mode="nearest")` semantics).
3. The result is `[num_frames, 2, dim]` float32, token rows `2f, 2f+1` → frame f.
"""

from __future__ import annotations

import abc
from typing import Protocol, runtime_checkable

import numpy as np

from keyface_jax.data.schema import AUDIO_RATE, SAMPLES_PER_FRAME, TOKENS_PER_FRAME


@runtime_checkable
class AudioFeatureExtractor(Protocol):
    """What the dataset preparation calls: `extractor(waveform, num_frames) -> [F, 2, dim]`."""

    name: str
    dim: int

    def __call__(self, waveform: np.ndarray, num_frames: int,
                 sample_rate: int = AUDIO_RATE) -> np.ndarray: ...


def check_waveform(waveform, sample_rate: int = AUDIO_RATE) -> np.ndarray:
    """Validates a 16 kHz mono float waveform and returns it as float32 [samples]."""
    if sample_rate != AUDIO_RATE:
        raise ValueError(
            f"audio extractors take {AUDIO_RATE} Hz audio, got sample_rate={sample_rate}; resample "
            "first (keyface_jax.audio.load_audio_16k_mono decodes and resamples any file)")
    wav = np.asarray(waveform)
    if wav.ndim == 2 and 1 in wav.shape:
        raise ValueError(f"expected a 1-D mono waveform [samples], got shape {wav.shape}; "
                         "squeeze the channel axis")
    if wav.ndim != 1:
        raise ValueError(f"expected a 1-D mono waveform [samples], got shape {wav.shape}; "
                         "stereo/multi-channel audio must be down-mixed (e.g. mean over channels)")
    if not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"expected a float waveform in [-1, 1], got dtype {wav.dtype}; "
                         "for 16-bit PCM divide by 32768")
    wav = wav.astype(np.float32, copy=False)
    if not np.all(np.isfinite(wav)):
        raise ValueError("waveform contains NaN or inf")
    return wav


def check_num_frames(num_frames) -> int:
    if isinstance(num_frames, bool) or int(num_frames) != num_frames or num_frames < 0:
        raise ValueError(f"num_frames must be a non-negative integer, got {num_frames!r}")
    return int(num_frames)


def fit_to_frames(waveform: np.ndarray, num_frames: int) -> np.ndarray:
    """Zero-pads or trims the end so that the waveform is exactly `num_frames · 640` samples."""
    target = num_frames * SAMPLES_PER_FRAME
    if waveform.shape[0] >= target:
        return waveform[:target]
    return np.pad(waveform, (0, target - waveform.shape[0]))


def frames_for_samples(num_samples: int) -> int:
    """Video frames (25 fps) covered by a 16 kHz waveform, rounding a partial last frame up."""
    return -(-int(num_samples) // SAMPLES_PER_FRAME)


def nearest_resample(tokens: np.ndarray, length: int) -> np.ndarray:
    """[L, D] → [length, D] picking row ⌊i·L/length⌋ (torch nearest-interpolation semantics)."""
    n = tokens.shape[0]
    if n == length:
        return tokens
    if n == 0:
        return np.zeros((length,) + tokens.shape[1:], tokens.dtype)
    index = np.minimum((np.arange(length) * n) // length, n - 1)
    return tokens[index]


def align_tokens(tokens: np.ndarray, num_frames: int, odd_rule: str = "resample") -> np.ndarray:
    """[L, D] encoder tokens → [num_frames, 2, D] following the module docstring's rule 2."""
    if odd_rule not in ("resample", "zero_pad"):
        raise ValueError(f"odd_rule must be 'resample' or 'zero_pad', got {odd_rule!r}")
    want = TOKENS_PER_FRAME * num_frames
    if odd_rule == "zero_pad" and tokens.shape[0] == want - 1 and want > 0:
        tokens = np.concatenate([tokens, np.zeros_like(tokens[:1])], axis=0)
    tokens = nearest_resample(tokens, want)
    return np.ascontiguousarray(tokens.reshape(num_frames, TOKENS_PER_FRAME, tokens.shape[-1]),
                                dtype=np.float32)


def standardize(waveform: np.ndarray, eps: float) -> np.ndarray:
    """(x − mean) / √(var + eps) over the whole array, in float64 (float32 out).

    wav2vec2's reference normalises the whole file with eps 1e-7 before fitting it to the frames;
    WavLM's (`normalize` checkpoints) applies `F.layer_norm(x, x.shape)`, eps 1e-5, to the span
    it encodes."""
    if waveform.size == 0:
        return waveform
    wav = waveform.astype(np.float64)
    return ((wav - wav.mean()) / np.sqrt(wav.var() + eps)).astype(np.float32)


class TokenExtractor(abc.ABC):
    """Base for encoders: validation and frame fitting here, `encode` in the subclass.

    Subclasses set `name`, `dim` and `odd_rule` and implement `encode(waveform, num_frames)`,
    which receives the waveform already fitted to `num_frames · 640` samples and returns either
    [L, dim] tokens (aligned here by `align_tokens`) or an already aligned [F, 2, dim] array.
    `prepare(waveform)` may transform the whole waveform before the fitting.

    `pad_to_even` (reference WavLM and BEATs): an odd frame count is encoded as F + 1 frames
    (one frame of zeros appended), aligned onto 2(F + 1) tokens, and the extra frame dropped,
    which is what `get_audio_embeddings.py` computes for frames 0..F−1.
    """

    name: str = "tokens"
    dim: int = 0
    odd_rule: str = "resample"
    pad_to_even: bool = False

    def prepare(self, waveform: np.ndarray) -> np.ndarray:
        """Whole-waveform preprocessing before frame fitting (e.g. normalisation); identity here."""
        return waveform

    def encoded_frames(self, num_frames: int) -> int:
        """Frames actually encoded for `num_frames` (one more when `pad_to_even` and odd)."""
        return num_frames + (num_frames % 2 if self.pad_to_even else 0)

    @abc.abstractmethod
    def encode(self, waveform: np.ndarray, num_frames: int) -> np.ndarray:
        ...

    def __call__(self, waveform, num_frames: int, sample_rate: int = AUDIO_RATE) -> np.ndarray:
        wav = check_waveform(waveform, sample_rate)
        num_frames = check_num_frames(num_frames)
        if num_frames == 0:
            return np.zeros((0, TOKENS_PER_FRAME, self.dim), np.float32)
        frames = self.encoded_frames(num_frames)
        out = np.asarray(self.encode(fit_to_frames(self.prepare(wav), frames), frames))
        if out.ndim == 2:
            out = align_tokens(out, frames, self.odd_rule)
        out = out[:num_frames]
        expected = (num_frames, TOKENS_PER_FRAME, self.dim)
        if out.shape != expected:
            raise RuntimeError(f"{self.name}: encoder gave {out.shape}, expected {expected}")
        return out.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


class AudioEventExtractor(TokenExtractor):
    """Base for audio-event encoders (BEATs-style) that carry laughter, sighs and other NSVs.

    The reference BEATs path (spec §2.3, §8): waveform·2^15 → Kaldi fbank (128 mels, 25 ms
    window, 10 ms hop) → (fbank − 15.41663) / (2·6.55582) → 16×16 patches → encoder embeddings
    (classifier head skipped). The flattened, time-major patch sequence (8 frequency patches per
    160 ms time patch) is nearest-resampled to 2·F tokens — so the "2 tokens of a frame" are
    mostly different *frequency* patches of one time patch. A subclass reproduces that by
    returning the flattened [num_patches, dim] sequence from `encode`; the default
    `odd_rule="resample"` then does the reference's nearest resampling.

    Built in: `get_extractor("beats:<checkpoint.pt>")` (`keyface_jax.audio.jax_encoders`). Another
    event encoder plugs in with `register_extractor("myevents", lambda arg, **kw: Mine(arg))`.
    Odd frame counts are padded to even, as the reference does for BEATs.
    """

    name = "event"
    odd_rule = "resample"
    pad_to_even = True


class ConcatExtractor:
    """Concatenates several extractors on the feature axis (speech ⊕ event, spec §2.3)."""

    def __init__(self, *extractors):
        if len(extractors) == 1 and isinstance(extractors[0], (list, tuple)):
            extractors = tuple(extractors[0])
        if not extractors:
            raise ValueError("ConcatExtractor needs at least one extractor")
        for ex in extractors:
            if not (callable(ex) and hasattr(ex, "dim") and hasattr(ex, "name")):
                raise TypeError(f"{ex!r} does not follow the AudioFeatureExtractor protocol")
        self.extractors = tuple(extractors)
        self.name = "+".join(ex.name for ex in self.extractors)
        self.dim = int(sum(ex.dim for ex in self.extractors))

    def __call__(self, waveform, num_frames: int, sample_rate: int = AUDIO_RATE) -> np.ndarray:
        wav = check_waveform(waveform, sample_rate)
        num_frames = check_num_frames(num_frames)
        parts = [ex(wav, num_frames, sample_rate=sample_rate) for ex in self.extractors]
        for ex, part in zip(self.extractors, parts):
            if part.shape != (num_frames, TOKENS_PER_FRAME, ex.dim):
                raise RuntimeError(f"{ex.name}: gave {part.shape}, "
                                   f"expected {(num_frames, TOKENS_PER_FRAME, ex.dim)}")
        return np.concatenate(parts, axis=-1).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"ConcatExtractor({', '.join(map(repr, self.extractors))})"
