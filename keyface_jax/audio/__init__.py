"""Audio features for KeyFace: 16 kHz mono waveform → [num_frames, 2, dim] tokens (spec §2.3).

    from keyface_jax.audio import get_extractor, load_audio_16k_mono
    wav = load_audio_16k_mono("clip.mp4")
    extractor = get_extractor("wavlm:/m/WavLM-Base+.pt+beats:/m/BEATs.pt")   # speech ⊕ event
    tokens = extractor(wav, num_frames)          # [num_frames, 2, 1536] float32

Every extractor follows `AudioFeatureExtractor` (name, dim, __call__); alignment rules are in
`keyface_jax.audio.base`. WavLM, wav2vec2 and BEATs run in JAX (`jax_encoders`, no torch needed;
weights from transformers folders or the original Microsoft checkpoints, `weights`); 'logmel'
needs no weights; the `*_torch` variants and HuBERT go through PyTorch transformers (`hf`).
"""

from keyface_jax.audio.base import (AudioEventExtractor, AudioFeatureExtractor, ConcatExtractor,
                                    TokenExtractor, align_tokens, check_waveform, fit_to_frames,
                                    frames_for_samples, nearest_resample)
from keyface_jax.audio.io import load_audio_16k_mono
from keyface_jax.audio.logmel import LogMelExtractor
from keyface_jax.audio.registry import (get_extractor, register_extractor, registered_prefixes,
                                        unregister_extractor)

__all__ = [
    "AudioEventExtractor", "AudioFeatureExtractor", "ConcatExtractor", "LogMelExtractor",
    "TokenExtractor", "align_tokens", "check_waveform", "fit_to_frames", "frames_for_samples",
    "get_extractor", "load_audio_16k_mono", "nearest_resample", "register_extractor",
    "registered_prefixes", "unregister_extractor",
]
