"""`get_extractor(spec)`: build audio feature extractors from short strings.

Specs are `prefix[:argument]`, several joined with `+` make a `ConcatExtractor` (speech ⊕ event):

    logmel                      built-in log-mel + Δ + ΔΔ, 240 dims (no weights, numpy only)
    logmel:768                  the same through a fixed orthonormal projection to 768 dims
    wavlm:<weights>             WavLM in JAX, last layer: a transformers folder, a cached hub
                                name or the original WavLM-Base+.pt / WavLM-Large.pt
    wav2vec2:<weights>          wav2vec2 in JAX, last hidden state: a transformers folder or name
    beats:<checkpoint.pt>       BEATs in JAX: an original {"cfg", "model"} BEATs checkpoint
    wavlm_torch:<folder|name>   the same encoders through PyTorch transformers (optional deps);
    wav2vec2_torch:<...>        `hubert`/`hubert_torch` (HubertModel) exist only this way
    wavlm:/m/WavLM-Base+.pt+beats:/m/beats.pt    both, concatenated on the feature axis

The JAX encoders need no torch (`keyface_jax.audio.jax_encoders`). Keyword arguments of
`get_extractor` go to every factory (e.g. `batch_size=` and `dtype=` for the JAX encoders,
`layer=` and `device=` for the torch ones).
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


def _jax(kind: str) -> Factory:
    def factory(arg: str, **kwargs):
        if not arg:
            raise ValueError(f"'{kind}:' needs a weights path, e.g. '{kind}:/models/{kind}'")
        from keyface_jax.audio import jax_encoders
        if kind == "beats":
            return jax_encoders.beats_extractor(arg, **kwargs)
        extractor = jax_encoders.speech_extractor(arg, **kwargs)
        if extractor.name != kind:
            raise ValueError(f"'{kind}:{arg}' holds a {extractor.name} model")
        return extractor
    return factory


register_extractor("logmel", _logmel)
for _kind in ("wavlm", "wav2vec2", "beats"):
    register_extractor(_kind, _jax(_kind))
for _kind in ("wavlm", "wav2vec2", "hubert"):
    register_extractor(f"{_kind}_torch", _hf(_kind))
register_extractor("hubert", _hf("hubert"))
