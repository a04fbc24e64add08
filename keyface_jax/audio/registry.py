"""`get_extractor(spec)`: build audio feature extractors from short strings.

Specs are `prefix[:argument]`, several joined with `+` make a `ConcatExtractor` (speech ⊕ event):

    logmel                      built-in log-mel + Δ + ΔΔ, 240 dims (no weights, numpy only)
    logmel:768                  the same through a fixed orthonormal projection to 768 dims
    wavlm:<folder or hub name>  transformers WavLMModel, last layer
    wav2vec2:<folder or name>   transformers Wav2Vec2Model, last hidden state
    hubert:<folder or name>     transformers HubertModel, last hidden state
    beats:<checkpoint>          whatever factory was registered for "beats" (none is built in)
    wav2vec2:/m/w2v+beats:/m/beats.pt    both, concatenated on the feature axis

Keyword arguments of `get_extractor` go to every factory (e.g. `layer=`, `device=`).
"""

from __future__ import annotations

from collections.abc import Callable

from keyface_jax.audio.base import ConcatExtractor

Factory = Callable[..., object]
_FACTORIES: dict[str, Factory] = {}


def register_extractor(prefix: str, factory: Factory, overwrite: bool = False) -> None:
    """Makes `get_extractor("<prefix>:<arg>")` call `factory(arg, **kwargs)`."""
    if not prefix or not prefix.isidentifier():
        raise ValueError(f"extractor prefix must be an identifier, got {prefix!r}")
    if prefix in _FACTORIES and not overwrite:
        raise ValueError(f"an extractor is already registered for {prefix!r}; "
                         "pass overwrite=True to replace it")
    _FACTORIES[prefix] = factory


def unregister_extractor(prefix: str) -> None:
    _FACTORIES.pop(prefix, None)


def registered_prefixes() -> list[str]:
    return sorted(_FACTORIES)


def get_extractor(spec: str, **kwargs):
    """Builds the extractor (or `ConcatExtractor`) a spec string names; see the module docstring."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"audio extractor spec must be a non-empty string, got {spec!r}")
    parts = [p.strip() for p in spec.split("+")]
    if len(parts) > 1:
        return ConcatExtractor([get_extractor(p, **kwargs) for p in parts])
    prefix, _, arg = parts[0].partition(":")
    prefix = prefix.strip().lower()
    if prefix not in _FACTORIES:
        if prefix == "beats":
            raise KeyError(
                "no 'beats' audio-event extractor is registered. BEATs (the reference NSV carrier, "
                "spec §8) has no transformers implementation, so plug one in: subclass "
                "keyface_jax.audio.AudioEventExtractor (implement encode(waveform, num_frames) "
                "returning the flattened [patches, 768] encoder output) and call "
                "keyface_jax.audio.register_extractor('beats', lambda path, **kw: MyBeats(path)). "
                "Without BEATs, 'logmel' (or 'logmel:768') is a dependency-free event channel.")
        raise KeyError(f"unknown audio extractor {prefix!r} in spec {spec!r}; "
                       f"registered: {registered_prefixes()}")
    return _FACTORIES[prefix](arg.strip(), **kwargs)


def _logmel(arg: str, **kwargs):
    from keyface_jax.audio.logmel import LogMelExtractor
    if arg:
        try:
            kwargs["dim"] = int(arg)
        except ValueError:
            raise ValueError(f"'logmel:<dim>' takes an integer width, got {arg!r}") from None
    return LogMelExtractor(**kwargs)


def _hf(kind: str) -> Factory:
    def factory(arg: str, **kwargs):
        from keyface_jax.audio.hf import HFSpeechExtractor
        return HFSpeechExtractor(kind, arg, **kwargs)
    return factory


register_extractor("logmel", _logmel)
for _kind in ("wavlm", "wav2vec2", "hubert"):
    register_extractor(_kind, _hf(_kind))
