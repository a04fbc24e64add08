"""The batched long-video pipeline on tiny random networks: lengths and audio sync, determinism,
batch independence, pinned boundaries, a manifest with broken entries, resume, jax.export."""

import json
import os

import jax
import numpy as np
import pytest
from scipy.io import wavfile

from keyface_jax.generation import export as gen_export
from keyface_jax.generation.inputs import ClipRequest
from keyface_jax.generation.manifest import read_manifest, requests_from_rows
from keyface_jax.generation.pipeline import GenerationOptions, Network
from keyface_jax.generation.runner import ModelSources, Setup, run
from keyface_jax.media.video import probe, read_frames
from keyface_jax.sampling.sampler import sample_keyframes
from keyface_jax.testing.media import write_face, write_speech
from tests.helpers import random_state

OPTIONS = GenerationOptions(keyframe_batch=2, interpolation_batch=2, decode_batch=2)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation_inputs")
    write_face(root / "face.png")
    for name, seconds, seed in (("a", 1.6, 0), ("b", 0.7, 1), ("long", 2.2, 2)):
        write_speech(root / f"{name}.wav", seconds, 22050, seed)     # resampled to 16 kHz
    wavfile.write(root / "silent.wav", 16000, np.zeros(16000, np.int16))
    write_speech(root / "blip.wav", 0.02, 16000, 3)                  # 320 samples < 1 frame
    return root


@pytest.fixture(scope="module")
def setup():
    sources = ModelSources(interpolation_bad="random")
    return Setup(sources, OPTIONS)


def request(media, name, out, **kw):
    return ClipRequest(name=name, face=str(media / "face.png"), audio=str(media / f"{name}.wav"),
                       output=str(out / f"{name}.mp4"), **kw)


def test_output_length_audio_and_determinism(setup, media, tmp_path):
    clip = setup.load(request(media, "a", tmp_path, emotion="happy"))
    assert clip.num_frames == 40                       # 1.6 s at 25 fps
    setup.generator.generate([clip], [str(tmp_path / "a.mp4")], progress=False)
    setup.generator.generate([clip], [str(tmp_path / "again.mp4")], progress=False)
    info = probe(tmp_path / "a.mp4")
    frames, _ = read_frames(tmp_path / "a.mp4")
    assert frames.shape == (40, 128, 128, 3)
    assert info.has_audio and info.audio_rate == 16000
    assert abs(info.audio_duration - 1.6) < 0.05 and abs(info.video_duration - 1.6) < 1e-6
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "again.mp4").read_bytes()
    assert not list(tmp_path.glob("*.partial*"))


def test_clip_result_does_not_depend_on_batch_mates(setup, media, tmp_path):
    gen = setup.generator
    options = gen.options
    try:
        gen.options = GenerationOptions(**{**options.__dict__, "save_latents": True})
        a = setup.load(request(media, "a", tmp_path))
        b = setup.load(request(media, "b", tmp_path, seed=5, emotion="sad"))
        gen.generate([a], [str(tmp_path / "alone.mp4")], progress=False)
        gen.generate([b, a], [str(tmp_path / "b.mp4"), str(tmp_path / "mixed.mp4")], progress=False)
    finally:
        gen.options = options
    alone = np.load(tmp_path / "alone.mp4.latents.npy")
    mixed = np.load(tmp_path / "mixed.mp4.latents.npy")
    assert alone.shape == (40, 16, 16, 4)
    np.testing.assert_allclose(mixed, alone, atol=1e-5)
    # pinned boundaries: every 13th latent is exactly its keyframe
    keyframes = gen.sample_keyframes([a], gen.encode_identities([a]), progress=False)[0]
    np.testing.assert_array_equal(alone[::13], keyframes[:len(alone[::13])])
    assert np.load(tmp_path / "b.mp4.latents.npy").shape[0] == 18   # 0.7 s


def test_single_frame_and_long_clip(setup, media, tmp_path):
    write_speech(tmp_path / "one.wav", 0.04)   # exactly one frame
    one = setup.load(ClipRequest(name="one", face=str(media / "face.png"), audio=str(tmp_path / "one.wav"),
                                 output=str(tmp_path / "one.mp4")))
    long = setup.load(request(media, "long", tmp_path, emotion="neutral,happy,sad"))
    assert (one.num_frames, long.num_frames) == (1, 55)
    results = setup.generator.generate([one, long], [str(tmp_path / "one.mp4"), str(tmp_path / "long.mp4")],
                                       progress=False)
    assert [r["frames"] for r in results] == [1, 55]
    assert read_frames(tmp_path / "one.mp4")[0].shape[0] == 1
    assert read_frames(tmp_path / "long.mp4")[0].shape[0] == 55


def test_manifest_with_broken_entries_and_resume(setup, media, tmp_path):
    manifest = tmp_path / "clips.csv"
    manifest.write_text("name,face,audio,emotion\n"
                        f"good,{media / 'face.png'},{media / 'b.wav'},happy\n"
                        f"noface,{media / 'missing.png'},{media / 'b.wav'},\n"
                        f"silent,{media / 'face.png'},{media / 'silent.wav'},\n"
                        f"blip,{media / 'face.png'},{media / 'blip.wav'},\n"
                        f"badmood,{media / 'face.png'},{media / 'b.wav'},grumpy\n")
    out = tmp_path / "out"
    requests = requests_from_rows(read_manifest(str(manifest)), str(out), {})
    summary = run(setup, requests, str(out / "summary.json"), progress=False)
    status = {name: clip["status"] for name, clip in summary.clips.items()}
    assert status == dict(good="done", noface="error", silent="error", blip="error", badmood="error")
    errors = {name: clip.get("error", "") for name, clip in summary.clips.items()}
    assert "missing.png" in errors["noface"] and "not found" in errors["noface"]
    assert "silent" in errors["silent"] and "shorter than one video frame" in errors["blip"]
    assert "unknown emotion" in errors["badmood"]
    first = (out / "good.mp4").read_bytes()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["counts"] == {"done": 1, "error": 4}
    # an interrupted re-run: the output is gone, a partial file is left; finished clips are kept
    (out / "good.mp4").rename(out / "good.partial.mp4")
    (out / "extra.mp4").write_bytes(b"finished earlier")
    requests.append(ClipRequest(name="extra", face=str(media / "face.png"), audio=str(media / "b.wav"),
                                output=str(out / "extra.mp4")))
    summary = run(setup, requests, str(out / "summary.json"), progress=False)
    assert (out / "good.mp4").read_bytes() == first                     # byte-identical rerun
    assert (out / "extra.mp4").read_bytes() == b"finished earlier"      # skipped, not redone
    assert summary.clips["extra"]["note"] == "existing output kept"
    assert not (out / "good.partial.mp4").exists()


def test_jax_export_matches_the_jitted_sampler(setup, media, tmp_path):
    gen = setup.generator
    manifest = gen_export.export_pipeline(gen, str(tmp_path / "exported"))
    b = gen.sizes["keyframe"]   # rounded up to a multiple of the devices (4 forced host devices)
    assert manifest["keyframe_sampler"]["outputs"] == [[b, 14, 16, 16, 4]]
    exported = jax.export.deserialize((tmp_path / "exported" / "keyframe_sampler.jax_exported").read_bytes())
    params = gen_export.load_weights(str(tmp_path / "exported" / "keyframe_weights.npz"))
    rng = np.random.default_rng(0)
    conditions = dict(identity=rng.standard_normal((b, 16, 16, 4)).astype(np.float32),
                      audio=rng.standard_normal((b, 14, 2, 32)).astype(np.float32),
                      valence=np.zeros((b, 14), np.float32), arousal=np.zeros((b, 14), np.float32))
    keys = jax.random.split(jax.random.key(3), b)
    sigmas = np.asarray(manifest["sigmas"], np.float32)
    served = exported.call(params, conditions, jax.random.key_data(keys), sigmas, np.float32(5),
                           np.float32(2))
    direct = sample_keyframes(gen.keyframe.graphdef, gen.keyframe.state, conditions, keys)
    np.testing.assert_allclose(np.asarray(served), np.asarray(direct), atol=1e-5)
    for name in ("interpolation_sampler", "decoder"):
        assert os.path.getsize(tmp_path / "exported" / manifest[name]["file"]) > 0


def test_keyframe_autoguidance_loads_a_weaker_network_and_is_not_exported(media, tmp_path):
    setup = Setup(ModelSources(interpolation_bad="none", keyframe_bad="random"),
                  GenerationOptions(keyframe_batch=2, keyframe_autoguidance_scale=3.0))
    assert setup.keyframe_bad_description == "random"
    gen = setup.generator
    # random-init networks share their zero-initialised output layers: seeded values everywhere
    main = random_state(gen.keyframe.state, seed=1)
    gen.keyframe = Network(gen.keyframe.graphdef, main)
    gen.keyframe_bad = Network(gen.keyframe.graphdef, random_state(main, seed=2))
    clip = setup.load(request(media, "a", tmp_path))
    identity = gen.encode_identities([clip])
    guided_keys = gen.sample_keyframes([clip], identity, progress=False)[0]
    weaker, gen.keyframe_bad = gen.keyframe_bad, None
    plain = gen.sample_keyframes([clip], identity, progress=False)[0]
    assert np.abs(guided_keys - plain).max() > 1e-3          # the extra term is applied
    gen.keyframe_bad = weaker
    with pytest.raises(ValueError, match="--keyframe_bad none"):
        gen_export.export_pipeline(gen, str(tmp_path / "exported"))
    assert not (tmp_path / "exported").exists()
