"""Audio feature extractors (spec §2.3): 2 tokens per 25 fps frame, alignment, registry, errors."""

import sys

import numpy as np
import pytest

from keyface_jax.audio import (AudioEventExtractor, AudioFeatureExtractor, ConcatExtractor,
                               LogMelExtractor, align_tokens, frames_for_samples, get_extractor,
                               load_audio_16k_mono, nearest_resample, register_extractor,
                               unregister_extractor)

SPF = 640


def _speechlike(n, seed=0):
    """Amplitude-modulated harmonic tone plus noise: enough structure for non-trivial features."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 8))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.1 * env * voiced + 0.01 * rng.standard_normal(n)).astype(np.float32)


# ----------------------------------------------------------------------------- logmel


@pytest.mark.parametrize("num_samples", [1, 639, 640, 641, 7 * SPF, 7 * SPF + 320, 16000, 16001])
def test_logmel_shapes_for_any_length(num_samples):
    ex = get_extractor("logmel")
    assert isinstance(ex, AudioFeatureExtractor) and ex.dim == 240
    wav = _speechlike(num_samples)
    frames = frames_for_samples(num_samples)
    assert frames == -(-num_samples // SPF)
    for f in (frames, frames + 3, max(1, frames - 1)):   # padding and trimming both work
        out = ex(wav, f)
        assert out.shape == (f, 2, 240) and out.dtype == np.float32
        assert np.all(np.isfinite(out))
    assert ex(wav, 0).shape == (0, 2, 240)


def test_logmel_padding_equals_explicit_zeros_and_trim_equals_prefix():
    ex = LogMelExtractor()
    wav = _speechlike(5 * SPF + 100)
    padded = np.concatenate([wav, np.zeros(6 * SPF - wav.size, np.float32)])
    np.testing.assert_array_equal(ex(wav, 6), ex(padded, 6))
    long = _speechlike(9 * SPF)
    np.testing.assert_array_equal(ex(long, 4), ex(long[:4 * SPF], 4))


@pytest.mark.parametrize("frame,offset", [(0, 100), (3, 320), (6, 590), (9, 40)])
def test_click_lands_in_its_frame(frame, offset):
    """A click inside frame k changes only frame k's log-mel rows (windows overlap ±40 samples)."""
    num_frames = 10
    wav = np.zeros(num_frames * SPF, np.float32)
    wav[frame * SPF + offset] = 0.8
    lm = LogMelExtractor(num_deltas=0)(wav, num_frames)            # [F, 2, 80]
    silent = LogMelExtractor(num_deltas=0)(np.zeros_like(wav), num_frames)
    changed = np.any(lm != silent, axis=(1, 2))
    assert changed.tolist() == [f == frame for f in range(num_frames)]
    # the full features (with deltas) peak in the click's frame too
    energy = get_extractor("logmel")(wav, num_frames)[..., :80].mean(axis=(1, 2))
    assert int(np.argmax(energy)) == frame


def test_logmel_is_deterministic_and_projection_is_fixed():
    wav = _speechlike(3 * 16000, seed=3)
    a = get_extractor("logmel")(wav, 75)
    b = get_extractor("logmel")(wav.copy(), 75)
    np.testing.assert_array_equal(a, b)
    p1, p2 = get_extractor("logmel:768"), get_extractor("logmel:768")
    assert p1.dim == 768 and p1.name == "logmel768"
    np.testing.assert_array_equal(p1(wav, 75), p2(wav, 75))
    # orthonormal projection keeps norms (dim > base) and is a fixed linear map of the features
    np.testing.assert_allclose(np.linalg.norm(p1(wav, 75), axis=-1), np.linalg.norm(a, axis=-1),
                               rtol=1e-4)
    small = get_extractor("logmel:32")(wav, 75)
    assert small.shape == (75, 2, 32)


def test_speech_and_silence_differ():
    wav = np.concatenate([np.zeros(16000, np.float32), _speechlike(16000)])
    lm = get_extractor("logmel")(wav, 50)[..., :80].mean(axis=(1, 2))
    assert lm[25:].mean() > lm[:25].mean() + 1.0


# ----------------------------------------------------------------------------- alignment rules


def test_nearest_resample_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    for length in (1, 5, 7, 12, 16, 29):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x.T[None]), size=length,
                                              mode="nearest")[0].numpy().T
        np.testing.assert_array_equal(nearest_resample(x, length), ref)


def test_align_tokens_rules():
    tokens = np.arange(9 * 2, dtype=np.float32).reshape(9, 2)   # 2F − 1 tokens for F = 5
    zp = align_tokens(tokens, 5, "zero_pad")
    assert zp.shape == (5, 2, 2)
    np.testing.assert_array_equal(zp.reshape(10, 2)[:9], tokens)
    np.testing.assert_array_equal(zp[4, 1], 0)
    rs = align_tokens(tokens, 5, "resample")
    np.testing.assert_array_equal(rs.reshape(10, 2), nearest_resample(tokens, 10))
    # zero_pad only covers the 2F − 1 case; other counts are resampled, never mis-reshaped
    np.testing.assert_array_equal(align_tokens(tokens, 3, "zero_pad").reshape(6, 2),
                                  nearest_resample(tokens, 6))
    with pytest.raises(ValueError, match="odd_rule"):
        align_tokens(tokens, 5, "repeat")


# ----------------------------------------------------------------------------- errors


def test_input_errors():
    ex = get_extractor("logmel")
    wav = _speechlike(16000)
    with pytest.raises(ValueError, match="16000 Hz"):
        ex(wav, 25, sample_rate=44100)
    with pytest.raises(ValueError, match="stereo"):
        ex(np.stack([wav, wav]), 25)
    with pytest.raises(ValueError, match="stereo"):
        ex(np.stack([wav, wav], axis=1), 25)
    with pytest.raises(ValueError, match="squeeze"):
        ex(wav[None], 25)
    with pytest.raises(ValueError, match="32768"):
        ex((wav * 32767).astype(np.int16), 25)
    with pytest.raises(ValueError, match="NaN"):
        ex(np.full(640, np.nan, np.float32), 1)
    with pytest.raises(ValueError, match="num_frames"):
        ex(wav, -1)
    with pytest.raises(ValueError, match="num_frames"):
        ex(wav, 2.5)


def test_registry_errors():
    with pytest.raises(KeyError, match="unknown audio extractor"):
        get_extractor("mfcc")
    with pytest.raises(FileNotFoundError, match="BEATs_iter3_plus_AS2M.pt"):
        get_extractor("beats:/models/BEATs_iter3_plus_AS2M.pt")
    with pytest.raises(ValueError, match="needs a weights path"):
        get_extractor("beats")
    with pytest.raises(ValueError, match="integer"):
        get_extractor("logmel:wide")
    with pytest.raises(ValueError, match="non-empty"):
        get_extractor("")
    with pytest.raises(ValueError, match="already registered"):
        register_extractor("logmel", lambda arg: None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_extractor("wav2vec2:/nonexistent/folder/wav2vec2")


class _FakeBeats(AudioEventExtractor):
    """Stands in for BEATs: 8 'frequency patches' per 160 ms time patch, flattened time-major."""

    dim = 12

    def __init__(self, path):
        self.path = path

    def encode(self, waveform, num_frames):
        n_time = -(-waveform.size // 2560)
        rms = np.sqrt(np.mean(np.pad(waveform, (0, n_time * 2560 - waveform.size))
                              .reshape(n_time, 2560) ** 2, axis=1))
        patches = np.repeat(rms, 8)[:, None] * np.arange(1, self.dim + 1)[None]
        return patches.astype(np.float32)


@pytest.fixture
def fake_beats():
    register_extractor("fakebeats", lambda path, **kw: _FakeBeats(path, **kw))
    yield
    unregister_extractor("fakebeats")


def test_registered_event_extractor_and_concat(fake_beats):
    wav = _speechlike(2 * 16000 + 123)
    beats = get_extractor("fakebeats:/models/beats.pt")
    assert isinstance(beats, _FakeBeats) and beats.path == "/models/beats.pt"
    out = beats(wav, 51)
    assert out.shape == (51, 2, 12)
    # an odd frame count is encoded as 52 frames (the reference's even padding), then trimmed
    padded = np.pad(wav, (0, 52 * SPF - wav.size))
    np.testing.assert_array_equal(out, align_tokens(beats.encode(padded, 52), 52)[:51])
    both = get_extractor("logmel + fakebeats:/models/beats.pt")
    assert isinstance(both, ConcatExtractor) and both.dim == 252
    assert both.name == "logmel+event"
    cat = both(wav, 51)
    assert cat.shape == (51, 2, 252)
    np.testing.assert_array_equal(cat[..., :240], get_extractor("logmel")(wav, 51))
    np.testing.assert_array_equal(cat[..., 240:], out)
    with pytest.raises(TypeError, match="protocol"):
        ConcatExtractor(get_extractor("logmel"), object())


# ----------------------------------------------------------------------------- transformers
# The PyTorch path ('<kind>_torch:'); the JAX encoders are compared with it and with
# transformers itself in tests/test_audio_encoders*.py.


def _tiny_configs():
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                  hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  feat_proj_dropout=0.0, layerdrop=0.0)
    return {
        "wavlm": (transformers.WavLMConfig(**common, num_buckets=16, max_bucket_distance=64),
                  transformers.WavLMModel),
        "wav2vec2": (transformers.Wav2Vec2Config(**common), transformers.Wav2Vec2Model),
        "hubert": (transformers.HubertConfig(**common), transformers.HubertModel),
    }


@pytest.fixture(scope="module")
def tiny_hf_models(tmp_path_factory):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    folders = {}
    for kind, (config, cls) in _tiny_configs().items():
        folder = tmp_path_factory.mktemp(kind)
        cls(config).eval().save_pretrained(folder)
        folders[kind] = str(folder)
    return folders


@pytest.mark.parametrize("kind", ["wavlm", "wav2vec2", "hubert"])
def test_hf_extractors_offline(kind, tiny_hf_models, monkeypatch):
    import torch
    import transformers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_hf_models[kind]
    ex = get_extractor(f"{kind}_torch:{folder}")
    assert ex.dim == 32 and ex.name == kind
    for num_frames in (1, 7, 24):
        wav = _speechlike(num_frames * SPF - 200, seed=num_frames)  # short: padded to the frame
        out = ex(wav, num_frames)
        assert out.shape == (num_frames, 2, 32) and out.dtype == np.float32
        assert np.all(np.isfinite(out))
    # the reference rules, re-derived by hand: fit → (normalise) → last hidden state → 2F tokens
    wav = _speechlike(24 * SPF, seed=5)
    cls = {"wavlm": transformers.WavLMModel, "wav2vec2": transformers.Wav2Vec2Model,
           "hubert": transformers.HubertModel}[kind]
    model = cls.from_pretrained(folder, local_files_only=True).eval()
    x = wav.astype(np.float64)
    if kind == "wav2vec2":
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.astype(np.float32))[None]).last_hidden_state[0].numpy()
    assert ref.shape[0] == 2 * 24 - 1          # a 50 Hz conv stack gives 2F − 1 tokens
    out = ex(wav, 24).reshape(48, 32)
    if kind == "wavlm":
        np.testing.assert_allclose(out, nearest_resample(ref, 48), atol=1e-5)
    else:
        np.testing.assert_allclose(out[:47], ref, atol=1e-5)
        np.testing.assert_array_equal(out[47], 0)
    again = get_extractor(f"{kind}_torch:{folder}")(wav, 24)
    np.testing.assert_array_equal(out, again.reshape(48, 32))


def test_hf_layer_choice_chunking_and_concat(tiny_hf_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_hf_models["wav2vec2"]
    wav = _speechlike(20 * SPF, seed=2)
    first = get_extractor(f"wav2vec2_torch:{folder}", layer=0)(wav, 20)
    last = get_extractor(f"wav2vec2_torch:{folder}")(wav, 20)
    assert first.shape == last.shape == (20, 2, 32) and not np.allclose(first, last)
    # the given waveform is normalised before it is zero-padded to the frame count
    short = wav[:-300].astype(np.float64)
    normed = ((short - short.mean()) / np.sqrt(short.var() + 1e-7)).astype(np.float32)
    plain = get_extractor(f"wav2vec2_torch:{folder}", normalize=False)
    np.testing.assert_allclose(get_extractor(f"wav2vec2_torch:{folder}")(wav[:-300], 20),
                               plain(normed, 20), atol=1e-5)
    chunked = get_extractor(f"wav2vec2_torch:{folder}", chunk_seconds=0.4)(wav, 20)  # 10 frames
    assert chunked.shape == (20, 2, 32)
    both = get_extractor(f"wav2vec2_torch:{folder}+logmel")
    assert both.dim == 272 and both(wav, 20).shape == (20, 2, 272)


def test_hf_errors(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="save_pretrained"):
        get_extractor(f"wavlm_torch:{tmp_path}")           # a folder without a model
    with pytest.raises(OSError, match="could not load"):
        get_extractor("wavlm_torch:someone/not-a-cached-model")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="logmel"):
        get_extractor(f"hubert:{tmp_path}")


# ----------------------------------------------------------------------------- io


def test_load_audio_resamples_and_downmixes(tmp_path):
    from scipy.io import wavfile
    sr, seconds = 44100, 1.5
    t = np.arange(int(sr * seconds)) / sr
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, left], axis=1)
    path = tmp_path / "stereo44k.wav"
    wavfile.write(path, sr, (stereo * 32767).astype(np.int16))
    wav = load_audio_16k_mono(str(path))
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - 24000) <= 64
    spectrum = np.abs(np.fft.rfft(wav[2000:18000]))
    assert abs(np.fft.rfftfreq(16000, 1 / 16000)[np.argmax(spectrum)] - 440) <= 2
    assert 0.4 < np.abs(wav).max() < 0.6
    with pytest.raises(FileNotFoundError):
        load_audio_16k_mono(str(tmp_path / "missing.wav"))
