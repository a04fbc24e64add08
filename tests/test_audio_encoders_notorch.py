"""The JAX audio encoders need no torch: their modules import without torch, transformers, grain,
tfds, av or ml_collections, and `data_pipelines.prepare --audio_features 'wavlm:DIR+beats:FILE.pt'`
runs on demo videos in a subprocess whose `import torch` fails (a meta-path blocker installed by
a sitecustomize on PYTHONPATH). The weights are tiny random ones written here (with torch)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKER = '''
import sys

class _NoTorch:
    """Makes `import torch` (and transformers, which needs it) fail in this interpreter."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchaudio", "transformers"):
            raise ImportError(f"{name} is blocked: this process runs without torch")
        return None

sys.meta_path.insert(0, _NoTorch())
'''
HEAVY = ("torch", "transformers", "grain", "tensorflow_datasets", "tensorflow", "av",
         "ml_collections")


def _no_torch_env(tmp_path):
    folder = tmp_path / "no_torch"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return dict(os.environ, PYTHONPATH=str(folder), JAX_PLATFORMS="cpu", XLA_FLAGS="")


def _run(cmd, env, timeout=300):
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def test_encoder_modules_import_light(tmp_path):
    code = ("import sys\n"
            "try:\n    import torch\nexcept ImportError:\n    pass\n"
            "else:\n    raise SystemExit('torch was importable')\n"
            "import keyface_jax.audio, keyface_jax.audio.jax_encoders, keyface_jax.audio.weights\n"
            "from keyface_jax.audio import speech_model, beats_model, fbank, transformer\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
            "try:\n    keyface_jax.audio.get_extractor('wavlm_torch:/some/folder')\n"
            "except ImportError as e:\n    assert 'torch' in str(e), e\n"
            "else:\n    raise SystemExit('the torch path worked without torch')\n")
    out = _run([sys.executable, "-c", code], _no_torch_env(tmp_path))
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _tiny_wavlm_folder(path):
    torch.manual_seed(0)
    config = transformers.WavLMConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        num_buckets=8, max_bucket_distance=32)
    transformers.WavLMModel(config).eval().save_pretrained(path)
    return str(path)


def _tiny_beats_file(path):
    from keyface_jax.audio.beats_model import abstract_beats
    from keyface_jax.audio.configs import beats_config_from_cfg
    from keyface_jax.audio.weights import BEATS_RENAMES, random_state, rename
    from keyface_jax.conversion.nnx_torch import export_torch_state_dict
    cfg = dict(input_patch_size=16, embed_dim=8, encoder_layers=1, encoder_embed_dim=16,
               encoder_ffn_embed_dim=32, encoder_attention_heads=2, conv_pos=8,
               conv_pos_groups=2, relative_position_embedding=True, num_buckets=8,
               max_distance=32, gru_rel_pos=True, deep_norm=True)
    model = random_state(abstract_beats(beats_config_from_cfg(cfg)), seed=1)
    state = rename(export_torch_state_dict(model), BEATS_RENAMES, reverse=True)
    pos = "encoder.pos_conv.0."
    weight = state.pop(pos + "weight")           # stored as a weight norm, like the original
    state[pos + "weight_v"] = weight
    state[pos + "weight_g"] = np.sqrt(np.square(weight).sum(axis=(0, 1), keepdims=True))
    torch.save({"cfg": cfg, "model": {k: torch.from_numpy(np.array(v, np.float32))
                                      for k, v in state.items()}}, path)
    return str(path)


def test_prepare_with_wavlm_and_beats_without_torch(tmp_path):
    from data_pipelines.demo.build import build_dataset
    from keyface_jax.audio import get_extractor
    from keyface_jax.media.audio import align_to_frames, read_audio
    from keyface_jax.media.video import FrameReader

    demo = tmp_path / "demo"
    build_dataset(str(demo), num_videos=2, seconds=2.0, size=64, seed=0)
    spec = (f"wavlm:{_tiny_wavlm_folder(tmp_path / 'wavlm')}"
            f"+beats:{_tiny_beats_file(tmp_path / 'BEATs.pt')}")
    out = tmp_path / "dataset"
    cmd = [sys.executable, "-m", "data_pipelines.prepare", "--config", "configs/keyframe.py:tiny",
           "--videos", str(demo / "videos"), "--output", str(out), "--vae", "random",
           "--emotions", str(demo / "emotions"), "--audio_features", spec,
           "--batch_size", "4", "--noprogress"]
    result = _run(cmd, _no_torch_env(tmp_path))
    assert "warning: audio features" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processed"], summary["skipped"]) == (2, 0)
    options = json.loads((out / "_prepare" / "options.json").read_text())
    assert options["dataset"]["audio_dim"] == 32
    assert options["dataset"]["audio_features"] == "wavlm+beats"

    import tensorflow_datasets as tfds
    records = tfds.builder_from_directory(str(out)).as_data_source()["train"]
    videos = json.loads((out / "videos.json").read_text())
    video = videos[0] if isinstance(videos, list) else videos["videos"][0]
    stored = np.stack([records[video["first_record"] + k]["audio"]
                       for k in range(video["num_frames"])])
    # the same features computed here, in the test process, from the same decoded audio
    reader = FrameReader(video["source"], 25)
    n = sum(1 for _ in reader)
    wave = align_to_frames(read_audio(video["source"], 16000), reader.start_time, n, 25)
    np.testing.assert_allclose(stored, get_extractor(spec)(wave, n), rtol=0, atol=1e-5)
    assert stored.shape == (n, 2, 32) and stored[..., :16].std() > 0 and stored[..., 16:].std() > 0
