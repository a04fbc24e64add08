"""WavLM, wav2vec2 and BEATs as audio feature extractors, in JAX (no torch).

    from keyface_jax.audio import get_extractor
    wavlm = get_extractor("wavlm:/models/WavLM-Base+.pt")         # or a transformers folder
    beats = get_extractor("beats:/models/BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt")
    tokens = wavlm(waveform_16k, num_frames)                      # [F, 2, 768]
    many = wavlm.batch([w1, w2, w3], [f1, f2, f3])                 # one batched jitted call

Per file, as the reference computes it (spec §2.3, `scripts/util/get_audio_embeddings.py`):

- wavlm: the waveform fitted to the frames (an odd count padded to even with a zero frame), a
  layer norm over it when the checkpoint asks (`normalize`), last layer, tokens nearest-resampled
  to 2·F (the padded frame is then dropped).
- wav2vec2: the whole file standardised ((x − mean)/√(var + 1e-7)) before fitting, last hidden
  state, one zero token appended to the 2F − 1 tokens of F frames; not resampled otherwise.
- beats: fitted and padded to even like wavlm; Kaldi fbank, patches, encoder; the time-major
  patch sequence nearest-resampled to 2·F tokens (so a frame's 2 tokens are mostly frequency
  patches of one 160 ms time patch: the reference's quirk, kept). Spans shorter than one time
  patch (175 ms) are zero-padded to it (the reference fails on them).

Files longer than `chunk_seconds` are encoded in chunks of whole (even) frames, each aligned on its
own, like the torch path. Waveforms are zero-padded to bucket lengths (`bucket_samples`, under
12.5 % padding) and masked, so a new length rarely compiles; `batch_size` items run per call, the
batch sharded over the local devices when it divides (weights replicated), as the VAE encoding
does (a per-file call, batch 1, runs on one device).

On TPUs, float32 matmuls default to bfloat16 passes; set `JAX_DEFAULT_MATMUL_PRECISION=highest`
for features within float32 rounding of the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from keyface_jax.audio.base import (TokenExtractor, align_tokens, check_num_frames,
                                    check_waveform, fit_to_frames, standardize)
from keyface_jax.data.schema import AUDIO_RATE, SAMPLES_PER_FRAME, TOKENS_PER_FRAME

BUCKET_QUANTUM = AUDIO_RATE // 2       # 0.5 s
BUCKETS_PER_OCTAVE = 8


def bucket_samples(n: int, quantum: int = BUCKET_QUANTUM) -> int:
    """n rounded up to a multiple of max(quantum, 2^⌊log2 n⌋ / 8): 0.5 s steps up to 4 s, then
    8 lengths per octave, so padding stays under 12.5 % (and one compile covers a range)."""
    step = max(quantum, (1 << max(int(n), 1).bit_length() - 1) // BUCKETS_PER_OCTAVE)
    return max(1, -(-int(n) // step)) * step


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, wave, lengths):
    tokens, _ = nnx.merge(graphdef, state)(wave, lengths)
    return tokens


class EncoderRunner:
    """A module `(wave [B, N], lengths [B]) → ([B, L, D], valid)` as a jitted batched function.

    `__call__(waves)` takes a list of 1-D float32 arrays and returns their valid tokens
    ([output_length(len), D] each), grouping them by bucket length into batches of `batch_size`
    (the last one padded with empty items, so each bucket compiles once)."""

    def __init__(self, model, output_length, *, batch_size: int = 1):
        self.output_length = output_length
        devices = jax.local_devices()
        self.batch_size = max(1, int(batch_size))
        graphdef, state = nnx.split(model)
        self._graphdef = graphdef
        if len(devices) > 1 and self.batch_size % len(devices) == 0:
            mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._batched = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
            self._state = jax.device_put(state, replicated)
        else:   # one device: a per-file call should not pay for idle padded copies
            self._batched = jax.sharding.SingleDeviceSharding(devices[0])
            self._state = jax.device_put(state, self._batched)

    def run_batch(self, waves: list[np.ndarray], bucket: int) -> list[np.ndarray]:
        """≤ batch_size waveforms, each ≤ bucket samples → their valid tokens."""
        batch = np.zeros((self.batch_size, bucket), np.float32)
        lengths = np.zeros(self.batch_size, np.int32)
        for i, w in enumerate(waves):
            batch[i, :len(w)] = w
            lengths[i] = len(w)
        out = _forward(self._graphdef, self._state, jax.device_put(batch, self._batched),
                       jax.device_put(lengths, self._batched))
        out = np.asarray(out[:len(waves)], np.float32)
        return [out[i, :self.output_length(len(w))] for i, w in enumerate(waves)]

    def __call__(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(waves)
        by_bucket: dict[int, list[int]] = {}
        for i, w in enumerate(waves):
            by_bucket.setdefault(bucket_samples(len(w)), []).append(i)
        for bucket, items in sorted(by_bucket.items()):
            for s in range(0, len(items), self.batch_size):
                part = items[s:s + self.batch_size]
                for i, tokens in zip(part, self.run_batch([waves[i] for i in part], bucket)):
                    results[i] = tokens
        return results


class JaxAudioExtractor(TokenExtractor):
    """An `AudioFeatureExtractor` over an `EncoderRunner`; see the module docstring.

    Args:
      runner: the jitted encoder.
      name, dim: the extractor's name (dataset metadata) and token width.
      odd_rule: "resample" (wavlm, beats) or "zero_pad" (wav2vec2); see `align_tokens`.
      pad_to_even: encode odd frame counts as one more frame (wavlm, beats).
      file_norm_eps: standardise the whole file with this eps (wav2vec2: 1e-7), or None.
      span_norm_eps: layer-norm each encoded span with this eps (WavLM `normalize`: 1e-5), or None.
      min_samples: shorter spans are zero-padded to this many samples.
      chunk_seconds: longest span encoded at once.
    """

    def __init__(self, runner: EncoderRunner, *, name: str, dim: int, odd_rule: str,
                 pad_to_even: bool, file_norm_eps: float | None = None,
                 span_norm_eps: float | None = None, min_samples: int = 0,
                 chunk_seconds: float = 1000.0):
        self.runner, self.name, self.dim = runner, name, int(dim)
        self.odd_rule, self.pad_to_even = odd_rule, pad_to_even
        self.file_norm_eps, self.span_norm_eps = file_norm_eps, span_norm_eps
        self.min_samples = int(min_samples)
        frames = max(1, int(chunk_seconds * AUDIO_RATE) // SAMPLES_PER_FRAME)
        self.chunk_frames = frames + (frames % 2 if pad_to_even else 0)

    def prepare(self, waveform: np.ndarray) -> np.ndarray:
        return waveform if self.file_norm_eps is None else standardize(waveform, self.file_norm_eps)

    def _spans(self, wav: np.ndarray, num_frames: int) -> list[tuple[int, np.ndarray]]:
        spans = []
        for start in range(0, num_frames, self.chunk_frames):
            n = min(self.chunk_frames, num_frames - start)
            span = wav[start * SAMPLES_PER_FRAME:(start + n) * SAMPLES_PER_FRAME]
            if self.span_norm_eps is not None:
                span = standardize(span, self.span_norm_eps)
            if len(span) < self.min_samples:
                span = np.pad(span, (0, self.min_samples - len(span)))
            spans.append((n, span))
        return spans

    def encode(self, waveform: np.ndarray, num_frames: int) -> np.ndarray:
        spans = self._spans(waveform, num_frames)
        tokens = self.runner([s for _, s in spans])
        return np.concatenate([align_tokens(t, n, self.odd_rule)
                               for (n, _), t in zip(spans, tokens)])

    def batch(self, waveforms, frame_counts, sample_rate: int = AUDIO_RATE) -> list[np.ndarray]:
        """Several files in as few batched calls as their bucket lengths allow; the same values
        as calling the extractor on each file. Returns [[F_i, 2, dim] float32]."""
        if len(waveforms) != len(frame_counts):
            raise ValueError(f"{len(waveforms)} waveforms for {len(frame_counts)} frame counts")
        jobs = []           # (file, frames, spans)
        for i, (w, f) in enumerate(zip(waveforms, frame_counts)):
            wav, f = check_waveform(w, sample_rate), check_num_frames(f)
            frames = self.encoded_frames(f)
            jobs.append((f, frames, self._spans(fit_to_frames(self.prepare(wav), frames), frames)
                         if f else []))
        flat = self.runner([s for _, _, spans in jobs for _, s in spans])
        out, k = [], 0
        for f, frames, spans in jobs:
            if not f:
                out.append(np.zeros((0, TOKENS_PER_FRAME, self.dim), np.float32))
                continue
            parts = [align_tokens(flat[k + j], n, self.odd_rule) for j, (n, _) in enumerate(spans)]
            k += len(spans)
            out.append(np.concatenate(parts)[:f])
        return out


def speech_extractor(source: str, *, batch_size: int = 1, dtype=None, normalize: bool | None = None,
                     chunk_seconds: float = 1000.0) -> JaxAudioExtractor:
    """WavLM or wav2vec2 from a transformers folder / cached hub name / original WavLM `.pt`."""
    from keyface_jax.audio.weights import load_speech_encoder
    model, cfg, ckpt_normalize = load_speech_encoder(source, dtype=_dtype(dtype))
    norm = ckpt_normalize if normalize is None else bool(normalize)
    runner = EncoderRunner(model, cfg.output_length, batch_size=batch_size)
    wavlm = cfg.kind == "wavlm"
    return JaxAudioExtractor(
        runner, name=cfg.kind, dim=cfg.dim, odd_rule="resample" if wavlm else "zero_pad",
        pad_to_even=wavlm, file_norm_eps=1e-7 if norm and not wavlm else None,
        span_norm_eps=1e-5 if norm and wavlm else None, min_samples=cfg.min_samples,
        chunk_seconds=chunk_seconds)


def beats_extractor(source: str, *, batch_size: int = 1, dtype=None,
                    chunk_seconds: float = 1000.0) -> JaxAudioExtractor:
    """BEATs from an original `{"cfg", "model"}` checkpoint (the classifier head is skipped)."""
    from keyface_jax.audio.weights import load_beats
    model, cfg = load_beats(source, dtype=_dtype(dtype))
    return JaxAudioExtractor(EncoderRunner(model, cfg.output_length, batch_size=batch_size),
                             name="beats", dim=cfg.dim, odd_rule="resample", pad_to_even=True,
                             min_samples=cfg.min_samples, chunk_seconds=chunk_seconds)


def _dtype(dtype):
    return None if dtype is None else jnp.dtype(dtype)
