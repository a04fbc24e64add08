"""Dataset preparation end to end on generated videos: exact frame/audio/emotion/latent alignment
read back through TFDS, every bad-input case, resume after an interruption, two hosts, face crops,
and the command line."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import keyframe
from data_pipelines import stages
from data_pipelines.emotions import NeutralEmotions, make_emotion_source
from data_pipelines.latents import LatentEncoder, random_encoder
from data_pipelines.video_arrays import PrepareOptions, Tools
from data_pipelines.stages import host_slice
from keyface_jax.media.video_list import list_videos
from keyface_jax.config_lib import autoencoder_config
from keyface_jax.data import tfds_io
from keyface_jax.data.schema import source_frame_index
from keyface_jax.media.video import write_video

H, W, SIZE = 96, 128, 128   # source frames; crops (the tiny config's image size)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def coded_frames(n: int) -> np.ndarray:
    """Frame k shows k in binary, 8 stripes of 12 px inside the centre square (x in [16, 112))."""
    frames = np.full((n, H, W, 3), 20, np.uint8)
    for k in range(n):
        for b in range(8):
            if (k >> b) & 1:
                frames[k, :, 16 + 12 * b:28 + 12 * b] = 235
    return frames


def decode_index(crops: np.ndarray) -> np.ndarray:
    centres = ((np.arange(8) + 0.5) * SIZE / 8).astype(int)
    bits = crops[:, SIZE // 2][:, centres, 0] > 127
    return (bits * (1 << np.arange(8))).sum(axis=1)


def make_video(path, seconds: float, fps: int, *, rate=44_100, channels=2, codec="aac",
               click_s=None, audio_s=None, level=0.02, frames=None):
    """Coded frames plus quiet noise (0 = digital silence) with a click at click_s."""
    n = round(seconds * fps)
    audio = None
    if audio_s != 0:
        samples = round((seconds if audio_s is None else audio_s) * rate)
        rng = np.random.default_rng(n)
        audio = (level * rng.standard_normal((samples, channels))).astype(np.float32)
        if click_s is not None:
            audio[round(click_s * rate)] = 0.95
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_video(path, coded_frames(n) if frames is None else frames, fps, audio=audio,
                audio_rate=rate, audio_codec=codec)


class Energy:
    """Test audio extractor: each token is the mean square of its 320 samples (×dim)."""

    name, dim = "energy", 3

    def __init__(self):
        self.calls = 0

    def __call__(self, waveform, num_frames, sample_rate=16_000):
        self.calls += 1
        energy = (waveform.reshape(num_frames, 2, 320) ** 2).mean(-1)
        return np.repeat(energy[..., None], self.dim, -1).astype(np.float32)


@pytest.fixture(scope="module")
def encoder():
    cfg = autoencoder_config(keyframe.get_config("tiny").autoencoder)
    return LatentEncoder(random_encoder(cfg, seed=0), batch_size=4, seed=0)


def prepare(videos, out, encoder, *, audio=None, detector=None, **kw):
    run_fields = {f.name for f in dataclasses.fields(stages.RunConfig)}
    run = stages.RunConfig(output=str(out), batch_size=4, progress=False,
                                **{k: v for k, v in kw.items() if k in run_fields})
    opts = PrepareOptions(image_size=SIZE, audio_features="energy",
                          **{k: v for k, v in kw.items() if k not in run_fields})
    audio = audio or Energy()
    tools = lambda: Tools(encoder=encoder, audio=audio, detector=detector,
                          emotions=make_emotion_source(opts.emotions))
    dataset = dict(latent_shape=[SIZE // 8, SIZE // 8, 4], audio_dim=audio.dim,
                   frame_shape=[SIZE, SIZE, 3] if opts.store_frames else None)
    return stages.prepare(list_videos(str(videos)), opts, run, tools_factory=tools,
                               dataset=dataset)


def read_split(out, split="train"):
    import tensorflow_datasets as tfds
    return tfds.builder_from_directory(str(out)).as_data_source()[split]


def test_round_trip_exact_alignment(tmp_path, encoder):
    videos, emos = tmp_path / "videos", tmp_path / "emotions"
    # (name, fps, seconds, audio rate, channels, codec, click time)
    specs = [("a", 30, 1.6, 44_100, 2, "aac", 0.51), ("g/b", 25, 1.2, 16_000, 1, "pcm_s16le", 0.33),
             ("c", 60, 1.0, 48_000, 1, "aac", 0.77)]
    for name, fps, seconds, rate, channels, codec, click in specs:
        make_video(videos / f"{name}.mp4", seconds, fps, rate=rate, channels=channels, codec=codec,
                   click_s=click)
    os.makedirs(emos / "g")
    src = np.arange(48) / 100  # "a": 48 values at 30 fps
    np.savez(emos / "a.npz", valence=src, arousal=-src, fps=30)
    with open(emos / "g" / "b.json", "w") as f:
        json.dump(dict(valence=[0.5] * 30, arousal=[-0.25] * 30), f)
    np.save(emos / "c.npy", np.stack([np.linspace(-1, 1, 24), np.zeros(24)], -1))  # 1 short

    summary = prepare(videos, tmp_path / "out", encoder, store_frames=True, emotions=str(emos))
    assert summary["status"] == "done" and summary["processed"] == 3, summary
    table = tfds_io.read_video_table(str(tmp_path / "out"))
    assert [(e.name, e.group, e.num_frames, e.source_fps) for e in table] == [
        ("a", "default", 40, 30.0), ("c", "default", 25, 60.0), ("g/b", "g", 30, 25.0)]
    records = read_split(tmp_path / "out")
    assert len(records) == 95
    for v, entry in enumerate(table):
        name, fps, _, _, _, _, click = next(s for s in specs if s[0] == entry.name)
        rows = [records[entry.first_record + k] for k in range(entry.num_frames)]
        assert [r["video_index"] for r in rows] == [v] * entry.num_frames
        assert [r["frame_index"] for r in rows] == list(range(entry.num_frames))
        crops = np.stack([r["frame"] for r in rows])
        np.testing.assert_array_equal(
            decode_index(crops), [source_frame_index(k, fps) for k in range(entry.num_frames)])
        energy = np.stack([r["audio"][:, 0] for r in rows])          # [frames, 2 tokens]
        assert np.unravel_index(np.argmax(energy), energy.shape) == divmod(int(click * 50), 2)
        latents = np.stack([r["latent"] for r in rows])
        np.testing.assert_allclose(latents, encoder(crops, name), rtol=1e-5, atol=1e-5)
        va = np.stack([[r["valence"], r["arousal"]] for r in rows])
        if name == "a":
            want = src[(np.arange(40) * 30 / 25 + 1e-6).astype(int)]
            np.testing.assert_allclose(va, np.stack([want, -want], -1), atol=1e-6)
        elif name == "g/b":
            np.testing.assert_allclose(va, [[0.5, -0.25]] * 30)
        else:
            np.testing.assert_allclose(va[:24, 0], np.linspace(-1, 1, 24), atol=1e-6)
            assert va[24, 0] == va[23, 0]  # one missing value: the last one held
    # the loaders' decoder reads the same values
    raw = tfds_io.open_frame_source(str(tmp_path / "out"), "train")
    import tensorflow_datasets as tfds
    features = tfds.builder_from_directory(str(tmp_path / "out")).info.features
    decoded = tfds_io.FrameDecoder(features, ["latent", "frame"])(raw[7])
    np.testing.assert_array_equal(decoded["latent"], records[7]["latent"])
    np.testing.assert_array_equal(decoded["frame"], records[7]["frame"])


def test_bad_inputs_are_skipped_with_reasons(tmp_path, encoder):
    v = tmp_path / "videos"
    make_video(v / "good.mp4", 1.2, 30)
    make_video(v / "silent.mp4", 1.2, 30, level=0.0)
    make_video(v / "short.mp4", 0.4, 25)
    make_video(v / "mismatch.mp4", 1.6, 25, audio_s=0.8)
    make_video(v / "noaudio.mp4", 1.2, 25, audio_s=0)
    (v / "zero.mp4").write_bytes(b"")
    (v / "corrupt.mp4").write_bytes(np.random.default_rng(1).bytes(20_000))
    whole = (v / "good.mp4").read_bytes()
    (v / "truncated.mp4").write_bytes(whole[:len(whole) // 2])
    frames = coded_frames(40)
    write_video(v / "faststart.mp4", frames, 25, audio=np.full((int(1.6 * 16_000), 1), 0.1),
                faststart=True)
    fast = (v / "faststart.mp4").read_bytes()
    (v / "faststart.mp4").write_bytes(fast[:len(fast) * 2 // 3])  # index intact, data cut

    summary = prepare(v, tmp_path / "out", encoder)
    reasons = {s["name"]: s["reason"] for s in summary["skipped_videos"]}
    mismatch = "audio/video length mismatch"
    expected = {"silent": "silent audio", "short": "too short", "mismatch": mismatch,
                "noaudio": "no audio stream", "zero": "empty file",
                "corrupt": "unreadable container", "truncated": "unreadable container",
                # the data ends mid-packet: a decoder error or, past it, a length mismatch
                "faststart": ("audio decode error", "video decode error", mismatch)}
    assert set(reasons) == set(expected), reasons
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    assert summary["processed"] == 1 and summary["status"] == "done"
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {s["file"] for s in on_disk["skipped_videos"]} == {str(v / f"{n}.mp4") for n in expected}
    assert [e.name for e in tfds_io.read_video_table(str(tmp_path / "out"))] == ["good"]


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    """A file list with groups and two splits, one bad video, and its one-host dataset."""
    root = tmp_path_factory.mktemp("listed")
    rows = [("s1/x.mp4", "spk1", "train", 30), ("s1/y.mp4", "spk1", "validation", 25),
            ("s2/x.mp4", "spk2", "train", 60), ("s2/z.mp4", "spk2", "train", 30),
            ("s3/bad.mp4", "spk3", "train", 0)]
    for path, _, _, fps in rows:
        if fps:
            make_video(root / "videos" / path, 1.0, fps, click_s=0.3)
        else:
            (root / "videos" / "s3").mkdir(parents=True)
            (root / "videos" / path).write_bytes(b"not a video")
    listing = root / "videos" / "list.tsv"
    listing.write_text("# path\tgroup\tsplit\n" + "".join(f"{p}\t{g}\t{s}\n" for p, g, s, _ in rows))
    return root, listing


def dataset_files(out) -> dict[str, bytes]:
    names = sorted(f for f in os.listdir(out) if f != "summary.json" and not f.startswith("_"))
    return {f: (out / f).read_bytes() for f in names}


def all_records(out, split):
    from array_record.python.array_record_module import ArrayRecordReader
    records = []
    for f in sorted(f for f in os.listdir(out) if f"-{split}.array_record-" in f):
        reader = ArrayRecordReader(str(out / f))
        records += reader.read_all()
        reader.close()
    return records


@pytest.fixture(scope="module")
def reference(listed, encoder):
    root, listing = listed
    summary = prepare(listing, root / "reference", encoder)
    assert summary["status"] == "done" and summary["processed"] == 4
    assert summary["splits"] == {"train": 75, "validation": 25}
    return root / "reference"


def test_list_names_groups_splits(listed, reference):
    _, listing = listed
    items = list_videos(str(listing))
    assert [(i.name, i.group, i.split) for i in items] == [
        ("s1/x", "spk1", "train"), ("s1/y", "spk1", "validation"), ("s2/x", "spk2", "train"),
        ("s2/z", "spk2", "train"), ("s3/bad", "spk3", "train")]
    assert host_slice(items, 2, 0) + host_slice(items, 2, 1) == items
    table = tfds_io.read_video_table(str(reference))
    assert [(e.name, e.split, e.first_record) for e in table] == [
        ("s1/x", "train", 0), ("s1/y", "validation", 0), ("s2/x", "train", 25),
        ("s2/z", "train", 50)]
    assert len(read_split(reference, "validation")) == 25
    assert read_split(reference, "train")[30]["video_index"] == 2


def test_resume_after_interruption_is_byte_identical(listed, reference, encoder, monkeypatch):
    root, listing = listed
    out = root / "resumed"
    monkeypatch.setenv(stages.STOP_AFTER_ENV, "2")
    with pytest.raises(stages.PrepareInterrupted):
        prepare(listing, out, encoder)
    monkeypatch.delenv(stages.STOP_AFTER_ENV)
    audio = Energy()
    summary = prepare(listing, out, encoder, audio=audio)
    assert summary["status"] == "done"
    assert audio.calls == 2  # 5 videos: 2 done before the stop, 1 bad (no features): 2 redone
    assert dataset_files(out) == dataset_files(reference)
    audio = Energy()
    assert prepare(listing, out, encoder, audio=audio)["status"] == "done" and audio.calls == 0
    assert dataset_files(out) == dataset_files(reference)
    with pytest.raises(ValueError, match="other options"):
        prepare(listing, out, encoder, latent="mode")


def test_two_hosts_match_one_host(listed, reference, encoder):
    root, listing = listed
    out = root / "two_hosts"
    first = prepare(listing, out, encoder, num_hosts=2, host_index=0, wait=False)
    assert first["status"] == "waiting"
    assert prepare(listing, out, encoder, num_hosts=2, host_index=1, wait=False)["status"] == \
        "host done"
    final = prepare(listing, out, encoder, num_hosts=2, host_index=0, wait=False)
    assert final["status"] == "done" and final["processed"] == 4 and final["skipped"] == 1
    for split in ("train", "validation"):
        assert all_records(out, split) == all_records(reference, split)
    assert (out / "videos.json").read_bytes() == (reference / "videos.json").read_bytes()
    assert len([f for f in os.listdir(out) if "-train.array_record-" in f]) == 2  # one per host
    assert len(read_split(out)) == 75


class BrightSquare:
    """Test face detector: the bounding box of the bright pixels."""

    def __call__(self, frame):
        ys, xs = np.nonzero(frame[..., 0] > 127)
        if len(xs) == 0:
            return np.zeros((0, 4))
        return np.array([[xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]],
                        float)


def test_face_crop_follows_detections_and_no_face(tmp_path, encoder):
    n = 40
    frames = np.full((n, H, W, 3), 10, np.uint8)
    for k in range(n):  # a 16 px "face" moving right
        x = 20 + 2 * k
        frames[k, 40:56, x:x + 16] = 240
    make_video(tmp_path / "v" / "face.mp4", 1.6, 25, frames=frames)
    make_video(tmp_path / "v" / "noface.mp4", 1.6, 25, frames=frames * 0)
    summary = prepare(tmp_path / "v", tmp_path / "out", encoder, detector=BrightSquare(),
                      crop="haar", crop_scale=3.0, crop_smoothing=1.0, detect_every=2,
                      store_frames=True)
    assert [s["name"] for s in summary["skipped_videos"]] == ["noface"]
    assert summary["skipped_videos"][0]["reason"].startswith("no face found")
    crops = np.stack([r["frame"] for r in read_split(tmp_path / "out")])
    assert crops.shape == (40, SIZE, SIZE, 3)
    mid = crops[:, SIZE // 2 - 8:SIZE // 2 + 8, SIZE // 2 - 8:SIZE // 2 + 8, 0]
    assert mid.min() > 200  # the face stays in the middle of every crop
    assert crops[:, :8, :8, 0].max() < 40 and crops[:, -8:, -8:, 0].max() < 40

    pytest.importorskip("cv2")
    from keyface_jax.media.face_crop import make_detector
    fallback = prepare(tmp_path / "v", tmp_path / "out2", encoder, detector=make_detector("haar"),
                       crop="haar", no_face="centre")
    assert fallback["processed"] == 2  # Haar finds no (real) face in either: centre crops


def test_command_line_with_worker_processes(tmp_path):
    for name, fps in (("p", 30), ("q", 25)):
        make_video(tmp_path / "videos" / f"{name}.mp4", 0.8, fps)
    (tmp_path / "videos" / "broken.mp4").write_bytes(b"\0" * 100)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_pipelines.prepare", "--config", "configs/keyframe.py:tiny",
           "--videos", str(tmp_path / "videos"), "--output", str(out), "--vae", "random",
           "--batch_size", "4", "--workers", "2", "--noprogress", "--latent", "mode"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped" in result.stdout and "broken.mp4" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processed"], summary["skipped"], summary["frames"]) == (2, 1, 40)
    options = json.loads((out / "_prepare" / "options.json").read_text())
    assert options["options"]["latent"] == "mode" and options["dataset"]["audio_dim"] == 32
    assert read_split(out)[0]["audio"].shape == (2, 32)


def test_neutral_emotions_shape():
    assert NeutralEmotions().for_video("x", "x.mp4", 5).shape == (5, 2)


def test_encoder_weights_from_diffusers_folder_and_sgm_file(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from data_pipelines.latents import load_encoder
    from keyface_jax.conversion.io import write_safetensors
    from keyface_jax.conversion.nnx_torch import export_torch_state_dict
    from keyface_jax.models.autoencoder import SCALE_FACTOR
    from keyface_jax.testing.vae_parity import make_random_diffusers_vae
    ref = make_random_diffusers_vae(dict(block_out_channels=[32, 64], layers_per_block=2), seed=0)
    ref.save_pretrained(tmp_path / "vae")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
        want = ref.encode(x).latent_dist.mean.numpy().transpose(0, 2, 3, 1) * SCALE_FACTOR
    cfg = autoencoder_config(keyframe.get_config("tiny").autoencoder)  # replaced by config.json
    model = load_encoder(str(tmp_path / "vae"), cfg)
    got = LatentEncoder(model, batch_size=2, mode=True)(images, "v")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert model.decoder is None  # the decoder is never materialised
    sgm = {f"first_stage_model.{k}": v for k, v in export_torch_state_dict(model).items()}
    write_safetensors(sgm, tmp_path / "svd.safetensors")
    again = load_encoder(str(tmp_path / "svd.safetensors"), model.config)
    np.testing.assert_array_equal(LatentEncoder(again, batch_size=2, mode=True)(images, "v"), got)


def test_options_follow_a_moved_dataset(tmp_path):
    """A dataset moved together with its inputs (e.g. a whole demo folder), or moved alone, is
    the same dataset; a changed input path or value is still refused."""
    def check(dataset, vae, **options):
        ws = stages.Workspace(stages.RunConfig(output=str(dataset)))
        stages.check_options(ws, dict(options=dataclasses.asdict(PrepareOptions(vae=str(vae), **options)),
                                      dataset=dict(audio_dim=32), name="d"))

    first, moved = tmp_path / "first", tmp_path / "moved"
    check(first / "dataset", first / "runs" / "vae")
    check(first / "dataset", first / "runs" / "vae")              # a plain re-run
    os.rename(first, moved)
    check(moved / "dataset", moved / "runs" / "vae")              # moved with its inputs
    options = json.loads((moved / "dataset" / "_prepare" / "options.json").read_text())
    assert options["options"]["vae"] == str(moved / "runs" / "vae")
    os.rename(moved / "dataset", tmp_path / "alone")
    check(tmp_path / "alone", moved / "runs" / "vae")             # moved alone
    with pytest.raises(ValueError, match="other options.*vae"):
        check(tmp_path / "alone", tmp_path / "other")
    with pytest.raises(ValueError, match="other options.*seed"):
        check(tmp_path / "alone", moved / "runs" / "vae", seed=3)
