"""JAX BEATs (keyface_jax.audio): the Kaldi fbank against an independent numpy Kaldi fbank, the
encoder against transformers' WavLM blocks where the two designs coincide, the whole model
(deep norm, query-driven gate, patches) against a PyTorch re-implementation written here from
the reference's formulas, the token rule with its quirk (spec §2.3), and checkpoint errors."""

import functools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax                                                                       # noqa: E402
import jax.numpy as jnp                                                          # noqa: E402
from flax import nnx                                                             # noqa: E402

from keyface_jax.audio import get_extractor, nearest_resample                    # noqa: E402
from keyface_jax.audio.fbank import kaldi_fbank                                   # noqa: E402
from keyface_jax.audio.jax_encoders import EncoderRunner                          # noqa: E402
from keyface_jax.audio.weights import (BEATS_RENAMES, load_beats, rename,         # noqa: E402
                                       weight_norm_names)
from keyface_jax.conversion.io import CheckpointError                            # noqa: E402

SPF = 640
D, E, H, FF, LAYERS, K, G, NB, MD = 32, 24, 2, 64, 2, 16, 4, 16, 64
CFG = dict(input_patch_size=16, embed_dim=E, conv_bias=False, encoder_layers=LAYERS,
           encoder_embed_dim=D, encoder_ffn_embed_dim=FF, encoder_attention_heads=H,
           activation_fn="gelu", layer_norm_first=False, deep_norm=True, conv_pos=K,
           conv_pos_groups=G, relative_position_embedding=True, num_buckets=NB, max_distance=MD,
           gru_rel_pos=True, finetuned_model=True, predictor_class=5, dropout=0.1)


@functools.lru_cache(maxsize=1)
def _mel_filters(bins=128):
    mel = lambda f: 1127.0 * np.log1p(f / 700.0)
    lo, hi = mel(20.0), mel(8000.0)
    step = (hi - lo) / (bins + 1)
    filters = np.zeros((257, bins))
    for b in range(bins):
        left, centre, right = lo + b * step, lo + (b + 1) * step, lo + (b + 2) * step
        for k in range(256):
            m = mel(k * 16000.0 / 512)
            if left < m <= centre:
                filters[k, b] = (m - left) / (centre - left)
            elif centre < m < right:
                filters[k, b] = (right - m) / (right - centre)
    return filters


def kaldi_fbank_reference(wave, bins=128):
    """Kaldi fbank, snip_edges, no dither, povey window, 512-point power spectrum, 20 Hz–Nyquist
    mel bands, log floored at float32 eps: a float64 loop over frames and filters."""
    x = np.asarray(wave, np.float64)
    frames = 1 + (len(x) - 400) // 160 if len(x) >= 400 else 0
    filters = _mel_filters(bins)
    window = np.hanning(400) ** 0.85
    out = np.zeros((frames, bins))
    for t in range(frames):
        f = x[160 * t:160 * t + 400]
        f = f - f.mean()
        f = np.concatenate([[f[0] * (1 - 0.97)], f[1:] - 0.97 * f[:-1]])
        power = np.abs(np.fft.rfft(f * window, 512)) ** 2
        out[t] = np.log(np.maximum(power @ filters, np.finfo(np.float32).eps))
    return out


def sound(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    chirp = np.sin(2 * np.pi * (200 + 1500 * t) * t)
    return (0.2 * chirp * (t > 0.05) + 0.02 * rng.standard_normal(n)).astype(np.float32)


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_kaldi_fbank_matches_reference():
    """Log energies agree to 2e-3 wherever float32 can resolve them (bins within e^18 ≈ 78 dB of
    the frame's loudest; a pure tone's far bins sit at float32's FFT noise floor), and in the
    power domain to 1e-6 of the frame's peak everywhere."""
    tone = 3000.0 + 800.0 * np.sin(2 * np.pi * 440 * np.arange(900) / 16000)   # with a DC offset
    waves = [sound(5555, seed=1) * 2 ** 15, np.zeros(1200), tone, sound(399) * 2 ** 15]
    fbank = jax.jit(kaldi_fbank)
    for w in waves:
        ref = kaldi_fbank_reference(w)
        ours = np.asarray(fbank(jnp.asarray(w, jnp.float32)[None]))[0]
        assert ours.shape == ref.shape == ((len(w) - 400) // 160 + 1 if len(w) >= 400 else 0, 128)
        if not ref.size:
            continue
        peak = ref.max(axis=1, keepdims=True)
        resolved = ref > peak - 18
        assert np.abs(ours - ref)[resolved].max() < 2e-3, np.abs(ours - ref)[resolved].max()
        assert (np.abs(np.exp(ours) - np.exp(ref)) / np.exp(peak)).max() < 1e-6
    silent = np.asarray(fbank(jnp.zeros((1, 1200))))
    np.testing.assert_allclose(silent, np.log(np.finfo(np.float32).eps), rtol=1e-6)


def _random_beats_state(rng, cfg=CFG):
    """Original-layout BEATs tensors (the relative table shared by every layer, as saved)."""
    n = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)
    sd = {"patch_embedding.weight": n(E, 1, 16, 16) * 0.3, "layer_norm.weight": 1 + n(E),
          "layer_norm.bias": n(E), "post_extract_proj.weight": n(D, E),
          "post_extract_proj.bias": n(D),
          "encoder.pos_conv.0.weight_g": np.abs(n(1, 1, K)) + 0.5,
          "encoder.pos_conv.0.weight_v": n(D, D // G, K), "encoder.pos_conv.0.bias": n(D),
          "encoder.layer_norm.weight": 1 + n(D), "encoder.layer_norm.bias": n(D),
          "predictor.weight": n(5, D), "predictor.bias": n(5)}
    table = n(NB, H) * 3
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"], sd[p + f"self_attn.{proj}.bias"] = n(D, D), n(D)
        sd[p + "self_attn.grep_linear.weight"] = n(8, D // H)
        sd[p + "self_attn.grep_linear.bias"] = n(8)
        sd[p + "self_attn.grep_a"] = 1 + n(1, H, 1, 1)
        sd[p + "self_attn.relative_attention_bias.weight"] = table
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = 1 + n(D), n(D)
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = n(FF, D), n(FF)
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = n(D, FF), n(D)
    return sd


def _save(path, cfg, sd):
    torch.save({"cfg": cfg, "model": {k: torch.from_numpy(np.ascontiguousarray(v))
                                      for k, v in sd.items()}}, path)
    return str(path)


def torch_beats_reference(sd, cfg, wave):
    """BEATs' forward from its formulas, in float64 PyTorch: [tokens, D]."""
    t = {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in sd.items()}
    F = torch.nn.functional
    fb = torch.from_numpy(kaldi_fbank_reference(np.asarray(wave, np.float64) * 2 ** 15))
    fb = (fb - 15.41663) / (2 * 6.55582)
    x = F.conv2d(fb[None, None], t["patch_embedding.weight"], stride=16)       # [1, E, T, 8]
    x = x.reshape(1, E, -1).transpose(1, 2)
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], t[p + ".weight"], t[p + ".bias"], 1e-5)
    lin = lambda x, p: F.linear(x, t[p + ".weight"], t[p + ".bias"])
    x = lin(ln(x, "layer_norm"), "post_extract_proj")[0]                       # [L, D]
    v, g = t["encoder.pos_conv.0.weight_v"], t["encoder.pos_conv.0.weight_g"]
    w = v * g / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    c = F.conv1d(x.T[None], w, t["encoder.pos_conv.0.bias"], padding=K // 2, groups=G)
    x = x + F.gelu(c[0, :, :x.shape[0]]).T
    x = ln(x, "encoder.layer_norm")
    n = x.shape[0]
    rel = torch.arange(n)[None] - torch.arange(n)[:, None]
    half, exact = NB // 2, NB // 4
    dist = rel.abs()
    large = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(MD / exact)
                     * (half - exact)).long()
    bucket = (rel > 0).long() * half + torch.where(dist < exact, dist, large.clamp(max=half - 1))
    bias = t["encoder.layers.0.self_attn.relative_attention_bias.weight"][bucket].permute(2, 0, 1)
    alpha = (2 * LAYERS) ** 0.25 if cfg["deep_norm"] else 1.0
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."
        q, k, vv = (lin(x, p + f"self_attn.{s}_proj").reshape(n, H, -1).transpose(0, 1)
                    for s in "qkv")
        gates = torch.sigmoid(lin(q, p + "self_attn.grep_linear").reshape(H, n, 2, 4).sum(-1))
        gate = gates[..., :1] * (gates[..., 1:] * t[p + "self_attn.grep_a"][0] - 1.0) + 2.0
        logits = q @ k.transpose(1, 2) / math.sqrt(D // H) + gate * bias
        attn = (logits.softmax(-1) @ vv).transpose(0, 1).reshape(n, D)
        x = ln(x * alpha + lin(attn, p + "self_attn.out_proj"), p + "self_attn_layer_norm")
        ffn = lin(F.gelu(lin(x, p + "fc1")), p + "fc2")
        x = ln(x * alpha + ffn, p + "final_layer_norm")
    return x.numpy()


@pytest.fixture(scope="module")
def beats_file(tmp_path_factory):
    sd = _random_beats_state(np.random.default_rng(0))
    return _save(tmp_path_factory.mktemp("beats") / "BEATs.pt", CFG, sd), sd


def test_beats_matches_reference_formulas(beats_file):
    path, sd = beats_file
    model, cfg = load_beats(path)
    assert cfg.encoder.residual_scale == pytest.approx(4 ** 0.25) and cfg.encoder.gate_from_query
    runner = EncoderRunner(model, cfg.output_length)
    for n in (16000, 13300):   # 13300: 81 fbank frames → 5 time patches + 1 frame left over
        wave = sound(n, seed=n)
        ref = torch_beats_reference(sd, CFG, wave)
        ours = runner([wave])[0]
        assert ours.shape == ref.shape == (cfg.output_length(n), D)
        assert rel_err(ours, ref) < 1e-4, rel_err(ours, ref)


def test_beats_encoder_matches_wavlm_blocks(tmp_path):
    """With q_proj = identity the query-driven gate reads the layer input, as WavLM's does, and
    with deep norm off the layers are WavLM's: a BEATs file built from transformers WavLM weights
    (our renaming map, reversed) must give transformers' WavLM encoder output."""
    torch.manual_seed(1)
    config = transformers.WavLMConfig(
        hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H, intermediate_size=FF,
        conv_dim=(16,) * 7, num_conv_pos_embeddings=K, num_conv_pos_embedding_groups=G,
        num_buckets=NB, max_bucket_distance=MD, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0)
    hf = transformers.WavLMModel(config).eval()
    with torch.no_grad():
        for p in hf.encoder.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for layer in hf.encoder.layers:
            layer.attention.q_proj.weight.copy_(torch.eye(D))
            layer.attention.q_proj.bias.zero_()
    enc = weight_norm_names({f"encoder.{k}": v.numpy() for k, v in hf.encoder.state_dict().items()})
    sd = rename(enc, BEATS_RENAMES, reverse=True)
    table = sd["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    sd["encoder.layers.1.self_attn.relative_attention_bias.weight"] = table
    front = _random_beats_state(np.random.default_rng(2))
    sd.update({k: v for k, v in front.items() if not k.startswith("encoder.")})
    model, _ = load_beats(_save(tmp_path / "b.pt", {**CFG, "deep_norm": False}, sd))
    x = np.random.default_rng(3).standard_normal((1, 37, D)).astype(np.float32)
    graphdef, state = nnx.split(model.encoder)
    run = jax.jit(lambda state, x, valid: nnx.merge(graphdef, state)(x, valid))
    ours = np.asarray(run(state, jnp.asarray(x), jnp.ones((1, 37), bool)))
    with torch.no_grad():
        ref = hf.encoder(torch.from_numpy(x)).last_hidden_state.numpy()
    assert rel_err(ours, ref) <= 1e-5


def test_beats_tokens_keep_the_reference_quirk(beats_file):
    """Patches nearest-resampled to 2·F(+1 if odd) tokens, time-major: a frame's two tokens are
    mostly two frequency patches of one 160 ms time patch."""
    path, _ = beats_file
    ex = get_extractor(f"beats:{path}")
    assert (ex.name, ex.dim, ex.pad_to_even) == ("beats", D, True)
    wave = sound(23 * SPF - 77, seed=4)
    padded = np.pad(wave, (0, 24 * SPF - wave.size))
    patches = ex.runner([padded])[0]
    assert patches.shape == (8 * ((1 + (24 * SPF - 400) // 160) // 16), D) == (40, D)
    ours = ex(wave, 23)
    np.testing.assert_array_equal(ours, nearest_resample(patches, 48)[:46].reshape(23, 2, D))
    index = (np.arange(48) * 40) // 48
    same_time_patch = (index[0:46:2] // 8) == (index[1:46:2] // 8)
    assert same_time_patch.mean() > 0.8
    tiny = ex(sound(300), 1)               # shorter than one time patch: zero-padded to 175 ms
    assert tiny.shape == (1, 2, D) and np.all(np.isfinite(tiny))


def test_beats_checkpoint_errors(beats_file, tmp_path):
    _, sd = beats_file
    bad_table = dict(sd)
    bad_table["encoder.layers.1.self_attn.relative_attention_bias.weight"] = np.zeros((NB, H),
                                                                                       np.float32)
    with pytest.raises(CheckpointError, match="layer 1's relative_attention_bias differs"):
        load_beats(_save(tmp_path / "t.pt", CFG, bad_table))
    missing = {k: v for k, v in sd.items() if k != "encoder.layers.1.fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys.*\n.*1.feed_forward.output_dense"):
        load_beats(_save(tmp_path / "m.pt", CFG, missing))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*\n.*layers.0.self_attn.extra"):
        load_beats(_save(tmp_path / "u.pt", CFG, {**sd, "encoder.layers.0.self_attn.extra":
                                                  np.zeros(2, np.float32)}))
    with pytest.raises(CheckpointError, match=r"patch_embedding.weight: checkpoint shape"):
        load_beats(_save(tmp_path / "s.pt", CFG, {**sd, "patch_embedding.weight":
                                                  np.zeros((E, 1, 8, 8), np.float32)}))
    with pytest.raises(ValueError, match="input_patch_size"):
        load_beats(_save(tmp_path / "c.pt", {k: v for k, v in CFG.items()
                                             if k != "input_patch_size"}, sd))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_extractor("beats:/models/BEATs_iter3_plus_AS2M.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        get_extractor(f"beats:{tmp_path / 'junk.pt'}")
