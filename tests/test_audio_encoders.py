"""JAX WavLM and wav2vec2 (keyface_jax.audio) against PyTorch transformers, tiny random configs
with every parameter perturbed: hidden states, padded/batched/sharded calls, the original
WavLM `.pt` layout, the per-file token rules (spec §2.3) and the weight errors."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from keyface_jax.audio import get_extractor, nearest_resample                    # noqa: E402
from keyface_jax.audio.configs import parse_conv_layers                         # noqa: E402
from keyface_jax.audio.jax_encoders import EncoderRunner, bucket_samples        # noqa: E402
from keyface_jax.audio.transformer import relative_position_buckets             # noqa: E402
from keyface_jax.audio.weights import (load_speech_encoder, rename,             # noqa: E402
                                       wavlm_renames, weight_norm_names)
from keyface_jax.conversion.io import CheckpointError                            # noqa: E402

SPF = 640
RTOL = 1e-5
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
              hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
              feat_proj_dropout=0.0, layerdrop=0.0)
VARIANTS = {   # Base/Base+ layout, Large layout (LayerNorm convs with bias, pre-LN), wav2vec2-base
    "wavlm": ("WavLM", dict(num_buckets=16, max_bucket_distance=64)),
    "wavlm_large": ("WavLM", dict(num_buckets=16, max_bucket_distance=64, feat_extract_norm="layer",
                                  do_stable_layer_norm=True, conv_bias=True)),
    "wav2vec2": ("Wav2Vec2", {}),
}


def speechlike(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    voiced = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6))
    return (0.1 * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * voiced
            + 0.02 * rng.standard_normal(n)).astype(np.float32)


def rel_err(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """kind → (perturbed transformers model, its save_pretrained folder)."""
    torch.manual_seed(0)
    out = {}
    for kind, (family, extra) in VARIANTS.items():
        config = getattr(transformers, f"{family}Config")(**COMMON, **extra)
        model = getattr(transformers, f"{family}Model")(config).eval()
        with torch.no_grad():
            for p in model.parameters():     # zero biases and unit norms too
                p.add_(0.2 * torch.randn_like(p))
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (model, str(folder))
    return out


def hf_hidden(model, wave):
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(wave, np.float32))[None]
        return model(x).last_hidden_state[0].numpy()


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_hidden_states_match_transformers(kind, hf_models):
    model, folder = hf_models[kind]
    jax_model, cfg, _ = load_speech_encoder(folder)
    runner = EncoderRunner(jax_model, cfg.output_length)
    for n in (16000, 14321):           # one exact bucket, one zero-padded to 16000 and masked
        wave = speechlike(n, seed=n)
        ref = hf_hidden(model, wave)
        ours = runner([wave])[0]
        assert ours.shape == ref.shape == (cfg.output_length(n), 32)
        assert rel_err(ours, ref) <= RTOL, (kind, n, rel_err(ours, ref))


def test_batched_sharded_call_equals_single_items(hf_models):
    model, folder = hf_models["wavlm"]
    jax_model, cfg, _ = load_speech_encoder(folder)
    runner = EncoderRunner(jax_model, cfg.output_length, batch_size=4)   # over the 4 CPU devices
    assert runner.batch_size == 4 and len(runner._batched.device_set) == 4
    waves = [speechlike(n, seed=n) for n in (16000, 14321, 12001)]       # one bucket, 1 empty slot
    assert {bucket_samples(len(w)) for w in waves} == {16000}
    for wave, ours in zip(waves, runner(waves)):
        assert rel_err(ours, hf_hidden(model, wave)) <= RTOL


def _original_wavlm_file(path, model, mode, normalize):
    """An original-layout WavLM checkpoint built from transformers weights with our renaming map."""
    sd = weight_norm_names({k: v.numpy() for k, v in model.state_dict().items()})
    sd.pop("masked_spec_embed")
    sd = rename(sd, wavlm_renames(mode), reverse=True)
    assert "encoder.layers.0.self_attn.grep_a" in sd and "post_extract_proj.weight" in sd
    sd["mask_emb"] = np.zeros(32, np.float32)
    c = model.config
    cfg = dict(extractor_mode=mode, encoder_layers=2, encoder_embed_dim=32,
               encoder_ffn_embed_dim=64, encoder_attention_heads=2, activation_fn="gelu",
               layer_norm_first=c.do_stable_layer_norm, conv_bias=c.conv_bias,
               conv_feature_layers="[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2",
               conv_pos=16, conv_pos_groups=4, relative_position_embedding=True, num_buckets=16,
               max_distance=64, gru_rel_pos=True, normalize=normalize, dropout=0.1)
    torch.save({"cfg": cfg, "model": {k: torch.from_numpy(np.ascontiguousarray(v))
                                      for k, v in sd.items()}}, path)


@pytest.mark.parametrize("kind,mode", [("wavlm", "default"), ("wavlm_large", "layer_norm")])
def test_original_wavlm_checkpoint_layout(kind, mode, hf_models, tmp_path):
    model, _ = hf_models[kind]
    path = tmp_path / "WavLM.pt"
    _original_wavlm_file(path, model, mode, normalize=kind == "wavlm_large")
    jax_model, cfg, normalize = load_speech_encoder(str(path))
    assert normalize == (kind == "wavlm_large") and cfg.feat_extract_norm == (
        "group" if mode == "default" else "layer")
    wave = speechlike(16000, seed=3)
    ours = EncoderRunner(jax_model, cfg.output_length)([wave])[0]
    assert rel_err(ours, hf_hidden(model, wave)) <= RTOL


def test_wavlm_extractor_rules(hf_models, tmp_path):
    """Odd F: one zero frame appended, nearest-resampled onto 2(F+1) tokens, extra frame dropped;
    `normalize` checkpoints: layer norm over the encoded span. Same as the torch extractor."""
    model, folder = hf_models["wavlm"]
    ex = get_extractor(f"wavlm:{folder}")
    assert (ex.name, ex.dim, ex.pad_to_even) == ("wavlm", 32, True)
    wave = speechlike(23 * SPF - 100, seed=7)
    padded = np.pad(wave, (0, 24 * SPF - wave.size))
    ref = nearest_resample(hf_hidden(model, padded), 48)[:46].reshape(23, 2, 32)
    ours = ex(wave, 23)
    assert rel_err(ours, ref) <= RTOL
    torch_path = get_extractor(f"wavlm_torch:{folder}")(wave, 23)
    assert rel_err(ours, torch_path) <= RTOL
    # normalize: F.layer_norm over the fitted, even span (the reference wrapper's order)
    path = tmp_path / "norm.pt"
    _original_wavlm_file(path, model, "default", normalize=True)
    normed = get_extractor(f"wavlm:{path}")(wave * 3.0, 23)
    span = padded.astype(np.float64) * 3.0
    span = ((span - span.mean()) / np.sqrt(span.var() + 1e-5)).astype(np.float32)
    ref = nearest_resample(hf_hidden(model, span), 48)[:46].reshape(23, 2, 32)
    assert rel_err(normed, ref) <= RTOL
    assert rel_err(get_extractor(f"wavlm_torch:{folder}", normalize=True)(wave * 3.0, 23),
                   normed) <= RTOL


def test_wav2vec2_extractor_rules(hf_models):
    """Whole file standardised before fitting; 2F − 1 tokens + one zero token; not resampled."""
    model, folder = hf_models["wav2vec2"]
    ex = get_extractor(f"wav2vec2:{folder}")
    assert (ex.name, ex.odd_rule, ex.pad_to_even) == ("wav2vec2", "zero_pad", False)
    wave = speechlike(25 * SPF + 300, seed=2) + 0.05      # longer than 24 frames: trimmed
    x = wave.astype(np.float64)
    x = ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)[:24 * SPF]
    ref = hf_hidden(model, x)
    assert ref.shape[0] == 47
    ours = ex(wave, 24).reshape(48, 32)
    assert rel_err(ours[:47], ref) <= RTOL and not ours[47].any()
    assert rel_err(get_extractor(f"wav2vec2_torch:{folder}")(wave, 24).reshape(48, 32),
                   ours) <= RTOL


def test_chunks_and_batch_api(hf_models):
    _, folder = hf_models["wavlm"]
    waves = [speechlike(n, seed=n) for n in (47 * SPF, 21 * SPF + 5)]
    ex = get_extractor(f"wavlm:{folder}", chunk_seconds=0.93)           # 23 (+1 → 24)-frame spans
    assert ex.chunk_frames == 24
    one = ex(waves[0], 47)
    whole = get_extractor(f"wavlm:{folder}")
    parts = [whole(np.pad(waves[0], (0, SPF))[s * SPF:(s + 24) * SPF], 24) for s in (0, 24)]
    np.testing.assert_allclose(one, np.concatenate(parts)[:47], rtol=0, atol=1e-5)
    many = ex.batch(waves, [47, 22])
    np.testing.assert_array_equal(many[0], one)
    np.testing.assert_array_equal(many[1], ex(waves[1], 22))
    assert ex.batch([waves[0]], [0])[0].shape == (0, 2, 32)


def test_attention_in_query_blocks_equals_one_block():
    """Long sequences (> 2 blocks) are attended block by block; same values, masks and bias."""
    import jax
    import jax.numpy as jnp
    from keyface_jax.audio.transformer import attend
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 3, 4)), jnp.float32) for _ in range(3))
    valid = jnp.arange(37)[None] < jnp.array([[37], [29]])
    table = jnp.asarray(rng.standard_normal((3, 73)), jnp.float32)
    gate = jnp.asarray(rng.uniform(1, 3, (2, 3, 37)), jnp.float32)
    for args in ((table, gate), (None, None)):
        one = jax.jit(lambda *a: attend(*a, block=64))(q, k, v, valid, *args)
        blocks = jax.jit(lambda *a: attend(*a, block=8))(q, k, v, valid, *args)
        np.testing.assert_allclose(np.asarray(blocks), np.asarray(one), rtol=1e-5, atol=1e-6)


def test_relative_buckets_match_transformers():
    from transformers.models.wavlm.modeling_wavlm import WavLMAttention
    rel = np.arange(-6000, 6000)
    for buckets, distance in ((320, 800), (16, 64)):
        attn = WavLMAttention(32, 2, num_buckets=buckets, max_distance=distance)
        ref = attn._relative_positions_bucket(torch.from_numpy(rel)).numpy()
        np.testing.assert_array_equal(relative_position_buckets(rel, buckets, distance), ref)


def test_weight_errors(hf_models, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, folder = hf_models["wavlm"]
    src = load_file(f"{folder}/model.safetensors")

    def folder_with(state, name, config="wavlm"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(open(f"{hf_models[config][1]}/config.json").read())
        save_file(state, str(d / "model.safetensors"))
        return str(d)

    missing = {k: v for k, v in src.items() if k != "encoder.layers.1.final_layer_norm.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys.*\n.*layers.1.final_layer_norm.bias"):
        load_speech_encoder(folder_with(missing, "missing"))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*\n.*encoder.extra.weight"):
        load_speech_encoder(folder_with({**src, "encoder.extra.weight": np.zeros(3, np.float32)},
                                        "extra"))
    bad = {**src, "feature_projection.projection.weight": np.zeros((32, 15), np.float32)}
    with pytest.raises(CheckpointError, match=r"projection.weight: checkpoint shape \(32, 15\)"):
        load_speech_encoder(folder_with(bad, "shape"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_extractor("wav2vec2:/nonexistent/folder/wav2vec2")
    with pytest.raises(ValueError, match="holds a wavlm model"):
        get_extractor(f"wav2vec2:{folder}")
    hub = tmp_path / "hubert"
    hub.mkdir()
    (hub / "config.json").write_text('{"model_type": "hubert"}')
    save_file({"x": np.zeros(1, np.float32)}, str(hub / "model.safetensors"))
    with pytest.raises(ValueError, match="hubert_torch"):
        get_extractor(f"wavlm:{hub}")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="'cfg' and 'model'"):
        get_extractor(f"wavlm:{tmp_path / 'plain.pt'}")


def test_conv_layer_spec_is_parsed_without_eval():
    assert parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2", "x") == (
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2)
    with pytest.raises(ValueError, match="unsupported"):
        parse_conv_layers("__import__('os').getcwd()", "x")
    with pytest.raises(ValueError, match="not a list"):
        parse_conv_layers("[(1, 2)]", "x")
