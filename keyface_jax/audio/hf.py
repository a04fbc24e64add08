"""Self-supervised speech encoders through `transformers` (PyTorch): WavLM, wav2vec2, HuBERT.

Optional: `transformers` and `torch` are imported only when one of these is built. Weights load
from a local folder (`config.json` + `model.safetensors`, what `save_pretrained` writes) or a hub
name that is already in the local cache; nothing is downloaded when `HF_HUB_OFFLINE=1`.

Reference behaviour (spec §2.3, `scripts/util/audio_wrapper.py`), the same as the JAX encoders
of `keyface_jax.audio.jax_encoders` (which need no torch; these remain as an option):

- wavlm: reference WavLM-Base+ (fairseq), last layer; an odd frame count is padded to even with
  a zero frame; a layer norm over the encoded span only if the checkpoint asks for it
  (`normalize`; for a transformers folder, its preprocessor's `do_normalize`); tokens
  nearest-resampled to 2·F, the padded frame dropped.
- wav2vec2: reference facebook/wav2vec2-base-960h, `model.wav2vec2` last hidden state; the whole
  file normalised to zero mean and unit variance; one zero token appended when the count is odd
  (2F − 1 → 2F).
- hubert: facebook/hubert-base-ls960 in the reference (a path KeyFace does not use);
  normalisation as its feature-extractor config says; tokens as wav2vec2.

The released WavLM-Base+ `.pt` is a fairseq checkpoint; its transformers conversion is
`microsoft/wavlm-base-plus` (same weights), which is what "wavlm_torch:<folder>" expects (the JAX
"wavlm:" reads the `.pt` itself). `normalize=` overrides the checkpoint's choice.

Long files are encoded in chunks of whole frames (`chunk_seconds`, default 1000 s, the reference's
chunk size), each chunk aligned to its own 2·F_chunk tokens.
"""

from __future__ import annotations

import os

import numpy as np

from keyface_jax.audio.base import TokenExtractor, align_tokens, standardize
from keyface_jax.data.schema import AUDIO_RATE, SAMPLES_PER_FRAME

KINDS = {
    # kind: (transformers class name, default normalisation, odd-token rule)
    "wavlm": ("WavLMModel", False, "resample"),
    "wav2vec2": ("Wav2Vec2Model", True, "zero_pad"),
    "hubert": ("HubertModel", False, "zero_pad"),
}
FILE_NORM_EPS = 1e-7     # wav2vec2/hubert: whole-file standardisation before fitting
SPAN_NORM_EPS = 1e-5     # WavLM `normalize`: F.layer_norm over the encoded span


def _import_transformers():
    try:
        import torch
        import transformers
    except ImportError as err:
        raise ImportError(
            "the wavlm/wav2vec2/hubert audio extractors need the optional dependencies torch and "
            f"transformers ({err}); install them (`pip install torch transformers`) or use the "
            "built-in 'logmel' extractor") from err
    return torch, transformers


class HFSpeechExtractor(TokenExtractor):
    """A transformers speech encoder as an `AudioFeatureExtractor`.

    Args:
      kind: "wavlm", "wav2vec2" or "hubert".
      source: local folder (or a hub name already in the cache).
      layer: None for the last hidden state (the reference), or an index into `hidden_states`
        (0 = the input to the first transformer layer).
      normalize: override the input normalisation (see the module docstring).
      device: torch device string.
      chunk_seconds: longest span fed to the encoder at once.
    """

    def __init__(self, kind: str, source: str, layer: int | None = None,
                 normalize: bool | None = None, device: str = "cpu",
                 chunk_seconds: float = 1000.0):
        if kind not in KINDS:
            raise ValueError(f"unknown speech encoder kind {kind!r}; choose one of {sorted(KINDS)}")
        if not source:
            raise ValueError(f"{kind}: give a model folder or hub name, e.g. '{kind}:/models/x'")
        torch, transformers = _import_transformers()
        class_name, default_norm, self.odd_rule = KINDS[kind]
        self._torch = torch
        self.kind, self.source, self.layer, self.device = kind, source, layer, device
        source = os.path.expanduser(source)
        local = os.path.isdir(source)
        # "org/name" may be a hub name; anything else that is not a folder is a missing path.
        if not local and (source.startswith((".", "/")) or source.count("/") > 1):
            raise FileNotFoundError(f"{kind}: model folder {source!r} does not exist")
        try:
            model = getattr(transformers, class_name).from_pretrained(
                source, local_files_only=local or _offline())
        except OSError as err:
            raise OSError(
                f"{kind}: could not load {source!r} ({err}). Pass a local folder written by "
                "`save_pretrained` (config.json + model.safetensors), or fetch the hub model "
                "into the cache on a machine with network access first") from err
        self.model = model.to(device).eval()
        from keyface_jax.audio.configs import preprocessor_normalize
        self.normalize = preprocessor_normalize(source) if normalize is None else bool(normalize)
        if self.normalize is None:
            self.normalize = default_norm
        self.dim = int(model.config.hidden_size)
        self.name = kind
        self.pad_to_even = kind == "wavlm"
        frames = max(1, int(chunk_seconds * AUDIO_RATE) // SAMPLES_PER_FRAME)
        self.chunk_frames = frames + (frames % 2 if self.pad_to_even else 0)

    def _tokens(self, wav: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(wav, np.float32))[None].to(self.device)
            out = self.model(x, output_hidden_states=self.layer is not None)
            h = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
            return h[0].float().cpu().numpy()

    def prepare(self, waveform: np.ndarray) -> np.ndarray:
        if not self.normalize or self.kind == "wavlm":
            return waveform
        return standardize(waveform, FILE_NORM_EPS)

    def encode(self, wav: np.ndarray, num_frames: int) -> np.ndarray:
        parts = []
        for start in range(0, num_frames, self.chunk_frames):
            n = min(self.chunk_frames, num_frames - start)
            chunk = wav[start * SAMPLES_PER_FRAME:(start + n) * SAMPLES_PER_FRAME]
            if self.normalize and self.kind == "wavlm":
                chunk = standardize(chunk, SPAN_NORM_EPS)
            parts.append(align_tokens(self._tokens(chunk), n, self.odd_rule))
        return np.concatenate(parts, axis=0)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
