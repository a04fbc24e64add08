"""Loaders over a tiny synthetic frame dataset whose values encode (video, frame): exact clip
alignment, eligibility, group balancing, determinism, resume at any batch, and sharding over
processes (two row ranges in one process, and a real two-process `jax.distributed` run on
localhost)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

DATA_KW = dict(latent_shape=(4, 4, 4), audio_dim=6, frame_shape=(8, 8, 3), shard_records=128)
# video: (frames, group, split). Keyframe clips span 170 frames, interpolation clips 14; a start is
# drawn below num_frames − span (reference bound), so 170- and 14-frame videos have no window.
VIDEOS = [(400, "a", "train"), (260, "a", "train"), (171, "b", "train"), (170, "b", "train"),
          (100, "c", "train"), (14, "c", "train"), (13, "c", "train"), (300, "a", "val"),
          (250, "nsv", "train")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_pipelines import synthetic_dataset as synthetic
    folder = str(tmp_path_factory.mktemp("frames") / "keyface_frames" / "1.0.0")
    table = synthetic.write_synthetic_dataset(folder, [v[0] for v in VIDEOS],
                                              groups=[v[1] for v in VIDEOS],
                                              splits=[v[2] for v in VIDEOS], **DATA_KW)
    return folder, table


def _config(folder, **kw):
    from keyface_jax.data.pipeline import DataConfig
    kw.setdefault("group_weights", {"a": 1, "b": 1, "c": 1, "nsv": 1})
    kw.setdefault("min_start", {"nsv": 120})
    return DataConfig(path=folder, **kw)


def _take(ds_or_it, n):
    it = iter(ds_or_it)
    out = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(n)]
    return it, out


def _close(it):
    if hasattr(it, "close"):
        it.close()


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------- format

def test_dataset_is_a_tfds_dataset(dataset):
    import tensorflow_datasets as tfds
    from keyface_jax.data import tfds_io
    folder, table = dataset
    assert [e.first_record for e in table] == [0, 400, 660, 831, 1001, 1101, 1115, 0, 1128]
    assert tfds_io.read_video_table(folder) == table
    builder = tfds.builder_from_directory(folder)
    assert builder.info.splits["train"].num_examples == sum(v[0] for v in VIDEOS if v[2] == "train")
    assert builder.info.splits["train"].num_shards > 1
    assert builder.info.metadata["videos"][7]["split"] == "val"
    # TFDS's own decoding, and the same split through tfds.data_source by name
    source = builder.as_data_source(split="train")
    record = source[400 + 37]
    assert (record["video_index"], record["frame_index"]) == (1, 37)
    np.testing.assert_array_equal(record["frame"][0, 0], [1, 37, 0])
    by_name = tfds.data_source("keyface_frames", data_dir=os.path.dirname(os.path.dirname(folder)),
                               split="val")
    assert by_name[5]["frame_index"] == 5 and by_name[5]["video_index"] == 7
    # the fast decoder agrees with TFDS field by field
    raw = tfds_io.open_frame_source(folder, "train")
    fields = ["video_index", "frame_index", "latent", "audio", "valence", "arousal", "frame"]
    fast = tfds_io.FrameDecoder(raw.dataset_info.features, fields)(raw[400 + 37])
    for key in fields:
        np.testing.assert_array_equal(fast[key], record[key], err_msg=key)


def test_writer_rejects_inconsistent_videos(tmp_path):
    from data_pipelines import synthetic_dataset as synthetic
    from data_pipelines.dataset_writer import write_frame_dataset
    entry, arrays = next(synthetic.synthetic_videos([20]))
    arrays["audio"] = arrays["audio"][:19]
    with pytest.raises(ValueError, match="num_frames=20 but array lengths"):
        write_frame_dataset(str(tmp_path / "d"), [(entry, arrays)], latent_shape=(4, 4, 4),
                            audio_dim=6)


def test_sixty_fps_mapping_matches_reference():
    from keyface_jax.data.schema import resampled_length, source_frame_index
    i = np.arange(20000)
    assert [source_frame_index(k, 60) for k in i] == [int(k * (60 / 25)) for k in i]
    assert [resampled_length(n, 60) for n in i] == [int(n * 25 / 60) for n in i]
    assert [source_frame_index(k, 25) for k in range(100)] == list(range(100))


# ------------------------------------------------------------------------------ clips and alignment

@pytest.mark.parametrize("kind", ["keyframe", "interpolation"])
def test_clip_alignment(dataset, kind):
    from data_pipelines import synthetic_dataset as synthetic
    from keyface_jax.data.pipeline import host_dataset
    folder, table = dataset
    cfg = _config(folder, kind=kind, global_batch=4, pixel_frames=-1)
    it, batches = _take(host_dataset(cfg), 3)
    _close(it)
    stride = 13 if kind == "keyframe" else 1
    for j, b in enumerate(batches):
        np.testing.assert_array_equal(b["draw_index"], 4 * j + np.arange(4))
        assert b["latents"].shape == (4, 14, 4, 4, 4) and b["audio"].shape == (4, 14, 2, 6)
        assert b["frames"].shape == (4, 14, 8, 8, 3) and b["frames"].dtype == np.float32
        pixels = np.round((b["frames"] + 1) * 127.5).astype(np.int64)  # [-1, 1] → the stored uint8
        for k in range(4):
            v, s = int(b["video_index"][k]), int(b["start"][k])
            frames = s + stride * np.arange(14)
            np.testing.assert_array_equal(b["frame_index"][k], frames)
            video, frame = synthetic.decode_latent(b["latents"][k])
            np.testing.assert_array_equal(video, v)
            np.testing.assert_array_equal(frame, frames)
            np.testing.assert_array_equal(b["latents"][k, :, 1, 2, :],
                                          1000 * v + frames[:, None] + np.arange(4) / 4)
            # the audio row of clip frame i is that same video frame, both tokens
            np.testing.assert_array_equal(b["audio"][k, :, :, 3],
                                          1000 * v + frames[:, None] + np.array([0, 0.5]))
            rgb = np.stack([np.full(14, v), frames % 256, frames // 256], -1)
            np.testing.assert_array_equal(pixels[k, :, 5, 5], rgb)
            if kind == "keyframe":
                np.testing.assert_array_equal(b["identity"][k], b["latents"][k, 0])
                np.testing.assert_array_equal(b["valence"][k], (frames / 1000).astype(np.float32))
                np.testing.assert_array_equal(b["arousal"][k], np.float32(-v / 100))
            else:
                np.testing.assert_array_equal(b["first"][k], b["latents"][k, 0])
                np.testing.assert_array_equal(b["last"][k], b["latents"][k, 13])
                assert "valence" not in b and "identity" not in b


def test_pixel_frames_drawn_per_batch(dataset):
    from keyface_jax.data.pipeline import host_dataset
    folder, _ = dataset
    it, batches = _take(host_dataset(_config(folder, global_batch=4, pixel_frames=2)), 4)
    _close(it)
    for b in batches:
        index = b["pixel_frame_index"][0]
        assert b["pixel_frame_index"].shape == (4, 2) and index[0] != index[1]
        np.testing.assert_array_equal(b["pixel_frame_index"], np.broadcast_to(index, (4, 2)))
        assert b["pixel_frames"].shape == (4, 2, 8, 8, 3) and "frames" not in b
        green = np.round((b["pixel_frames"][:, :, 0, 0, 1] + 1) * 127.5)
        np.testing.assert_array_equal(green, b["frame_index"][:, index] % 256)
    assert len({tuple(b["pixel_frame_index"][0]) for b in batches}) > 1


def test_only_videos_with_a_window_are_drawn(dataset):
    from keyface_jax.data.transforms import ClipSampler
    _, table = dataset
    weights = {"a": 1, "b": 1, "c": 1, "nsv": 1}
    key = ClipSampler(table, "keyframe", group_weights={"a": 1, "b": 1, "c": 0, "nsv": 0})
    assert sorted(key.video_probs()) == [0, 1, 2]  # 170-frame video 3 has no start < 0
    inter = ClipSampler(table, "interpolation", group_weights=weights, min_start={"nsv": 120})
    assert sorted(inter.video_probs()) == [0, 1, 2, 3, 4, 8]  # 14- and 13-frame videos excluded
    last = ClipSampler(table, "interpolation", group_weights=weights, include_last_window=True)
    assert sorted(last.video_probs()) == [0, 1, 2, 3, 4, 5, 8]
    assert sorted(ClipSampler(table, "keyframe", split="val").video_probs()) == [7]
    seen = {}
    for g in range(3000):
        v, s = inter.draw(g)
        lo = 120 if v == 8 else 0
        assert lo <= s < table[v].num_frames - 14, (v, s)
        seen.setdefault(v, set()).add(s)
    # every start of a short video appears (deterministic for the seed)
    assert seen[4] == set(range(100 - 14)) and min(seen[8]) == 120 and max(seen[8]) == 250 - 15
    with pytest.raises(ValueError, match="no video is long enough for a keyframe clip"):
        ClipSampler(table, "keyframe", group_weights={"a": 0, "b": 0, "c": 1, "nsv": 1},
                    min_start={"nsv": 120})
    with pytest.raises(ValueError, match=r"groups \['zz'\] are not in split 'train'"):
        ClipSampler(table, "keyframe", group_weights={"a": 1, "b": 1, "zz": 1})
    with pytest.raises(ValueError, match=r"groups \['b', 'nsv'\] have clips but no weight"):
        ClipSampler(table, "keyframe", group_weights={"a": 1})


def test_group_balancing_statistics(dataset):
    from keyface_jax.data.transforms import ClipSampler
    _, table = dataset
    n = 12000
    for weights, expect in [(None, {"a": 1 / 3, "b": 1 / 3, "nsv": 1 / 3}),
                            ({"a": 3, "b": 1, "c": 0, "nsv": 0}, {"a": 0.75, "b": 0.25})]:
        sampler = ClipSampler(table, "keyframe", group_weights=weights, seed=3,
                              include_last_window=True)  # b: videos 2 and 3; nsv: video 8
        counts = np.bincount([sampler.draw(g)[0] for g in range(n)], minlength=len(table))
        probs = sampler.video_probs()
        for group, p in expect.items():
            members = [i for i, e in enumerate(table) if e.group == group and e.split == "train"
                       and i in probs]
            got = counts[members].sum() / n
            assert abs(got - p) < 4 * np.sqrt(p * (1 - p) / n), (weights, group, got, p)
            for i in members:  # uniform within the group
                q = p / len(members)
                assert abs(counts[i] / n - q) < 4 * np.sqrt(q * (1 - q) / n), (weights, i)
        assert counts[[i for i in range(len(table)) if i not in probs]].sum() == 0


# ---------------------------------------------------------------------- determinism and resume

def test_order_depends_only_on_the_seed(dataset):
    from keyface_jax.data.pipeline import host_dataset
    folder, _ = dataset
    runs = []
    for seed, threads in [(0, 0), (0, 3), (1, 0)]:
        it, batches = _take(host_dataset(_config(folder, seed=seed, read_threads=threads)), 3)
        _close(it)
        runs.append(batches)
    _assert_batches_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0][0]["start"], runs[2][0]["start"])


def test_worker_processes_give_the_same_batches_and_resume(dataset):
    from keyface_jax.data.pipeline import host_dataset
    folder, _ = dataset
    it, want = _take(host_dataset(_config(folder, global_batch=2)), 6)
    _close(it)
    cfg = _config(folder, global_batch=2, worker_count=2, worker_buffer=1)
    it, got = _take(host_dataset(cfg), 3)
    state = it.get_state()
    _close(it)
    _assert_batches_equal(got, want[:3])
    resumed = iter(host_dataset(cfg))
    resumed.set_state(state)
    _, rest = _take(resumed, 3)
    _close(resumed)
    _assert_batches_equal(rest, want[3:])


def test_global_batches_on_the_mesh(dataset):
    import jax
    from jax.sharding import PartitionSpec
    from keyface_jax.data.batch_layout import batch_sharding, process_rows
    from keyface_jax.data.pipeline import host_dataset, make_loader
    from keyface_jax.sharding import make_mesh
    folder, _ = dataset
    mesh = make_mesh({"data": 2, "fsdp": 2})
    cfg = _config(folder, kind="interpolation", global_batch=8)
    loader = make_loader(cfg, mesh)
    batch = next(loader)
    assert process_rows(batch_sharding(mesh), 8) == (0, 8)
    for key, value in batch.items():
        assert isinstance(value, jax.Array) and value.shape[0] == 8, key
        assert value.sharding.spec == PartitionSpec(("data", "fsdp")), key
        assert len(value.addressable_shards) == 4
    assert batch["latents"].shape == (8, 14, 4, 4, 4) and batch["first"].shape == (8, 4, 4, 4)
    assert batch["audio"].shape == (8, 14, 2, 6)
    it, (want,) = _take(host_dataset(cfg), 1)
    _close(it)
    for key in want:
        np.testing.assert_array_equal(np.asarray(batch[key]), want[key], err_msg=key)
    loader.close()
    with pytest.raises(ValueError, match="global batch 6 does not divide"):
        make_loader(_config(folder, global_batch=6), mesh)


def test_a_loader_started_at_batch_j_continues_the_sequence(dataset):
    """What a resumed run relies on: the loader started at batch `start` (the restored step) gives
    exactly batches start, start + 1, … of an uninterrupted one, with or without prefetching."""
    from keyface_jax.data.pipeline import make_loader
    from keyface_jax.sharding import make_mesh
    folder, _ = dataset
    mesh = make_mesh({"data": 4})
    cfg = _config(folder, global_batch=4, seed=7)
    loader, want = _take(make_loader(cfg, mesh), 7)
    loader.close()
    for prefetch in (0, 2):
        cfg = _config(folder, global_batch=4, seed=7, prefetch=prefetch, device_prefetch=prefetch)
        resumed, got = _take(make_loader(cfg, mesh, start=3), 4)
        resumed.close()
        _assert_batches_equal(got, want[3:])
    assert [int(b["draw_index"][0]) for b in got] == [12, 16, 20, 24]


def test_trainer_entry_point(dataset):
    """`train_batches(config, mesh, start)` from the run config gives what the trainer expects:
    global batches on the batch sharding, the dataset's batches from `start` on."""
    import jax
    from configs import keyframe
    from keyface_jax.data.batch_layout import batch_sharding
    from keyface_jax.data.loader import data_config, train_batches
    from keyface_jax.data.pipeline import host_dataset
    from keyface_jax.sharding import make_mesh
    folder, _ = dataset
    config = keyframe.get_config("tiny")
    config.data.path = folder
    config.data.min_start = {"nsv": 120}
    cfg = data_config(config)
    assert (cfg.global_batch, cfg.seed, cfg.group_weights, cfg.pixel_frames) == (
        config.train.batch_size, config.seed, None, 0)
    config.objective.pixel_weight = 1.0
    assert data_config(config).pixel_frames == config.objective.pixel_frames
    it, (_, local) = _take(host_dataset(data_config(config)), 2)
    _close(it)
    mesh = make_mesh({"fsdp": -1})
    glob = train_batches(config, mesh, start=1)
    batch = next(glob)
    glob.close()
    assert batch["latents"].sharding == batch_sharding(mesh)
    assert isinstance(batch["identity"], jax.Array)
    assert local["pixel_frames"].shape[:2] == (config.train.batch_size, 1)
    for key in local:
        np.testing.assert_array_equal(np.asarray(batch[key]), local[key], err_msg=key)
    config.data.unlock()
    config.data.workers = 2   # the old name of worker_count: refused, not ignored
    with pytest.raises(ValueError, match="unknown keys \\['workers'\\]"):
        data_config(config)


def test_wrong_video_table_is_detected(dataset, tmp_path):
    import shutil
    from keyface_jax.data.pipeline import host_dataset
    folder, _ = dataset
    broken = str(tmp_path / "broken")
    shutil.copytree(folder, broken)
    with open(os.path.join(broken, "videos.json")) as f:
        rows = json.load(f)
    rows[0]["first_record"] += 1
    with open(os.path.join(broken, "videos.json"), "w") as f:
        json.dump(rows, f)
    cfg = _config(broken, group_weights={"a": 1, "b": 0, "c": 0, "nsv": 0})
    with pytest.raises(ValueError, match="the video table says video"):
        _take(host_dataset(cfg), 4)


# ------------------------------------------------------------------------------------- sharding

def test_two_shards_are_disjoint_and_cover_the_batch(dataset):
    from keyface_jax.data.pipeline import host_dataset
    folder, _ = dataset
    cfg = _config(folder, global_batch=6)
    parts = []
    for rows in [(0, 3), (3, 6), (0, 6)]:
        it, batches = _take(host_dataset(cfg, rows), 3)
        _close(it)
        parts.append(batches)
    for j in range(3):
        d0, d1 = parts[0][j]["draw_index"], parts[1][j]["draw_index"]
        assert not set(d0) & set(d1)
        np.testing.assert_array_equal(np.concatenate([d0, d1]), 6 * j + np.arange(6))
        for key in parts[2][j]:
            np.testing.assert_array_equal(
                np.concatenate([parts[0][j][key], parts[1][j][key]]), parts[2][j][key])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_jax_processes(dataset, tmp_path):
    """Two `jax.distributed` CPU processes (2 devices each) on one global mesh: each loads its own
    rows; together they give exactly the single-process batches; both resume at a later batch."""
    from keyface_jax.data.pipeline import host_dataset
    folder, _ = dataset
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, folder, str(tmp_path), str(port), str(i)],
                              env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    logs = [p.communicate(timeout=180)[0].decode()[-3000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(logs)
    results = [json.load(open(tmp_path / f"process{i}.json")) for i in range(2)]
    it, want = _take(host_dataset(_config(folder, global_batch=8, seed=5)), 4)
    _close(it)
    assert [r["rows"] for r in results] == [[0, 4], [4, 8]]
    for j in range(4):
        got = {}
        for r in results:
            for key, value in r["batches"][j].items():
                got.setdefault(key, []).append(np.asarray(value))
        assert not set(got["draw_index"][0]) & set(got["draw_index"][1])
        for key in ("draw_index", "video_index", "start", "latents"):
            np.testing.assert_array_equal(np.concatenate(got[key]), want[j][key], err_msg=key)
    assert all(r["resumed_equal"] for r in results)


def _two_process_worker(folder, workdir, port, process_id):
    import jax
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id)
    from keyface_jax.data.batch_layout import batch_sharding, process_rows
    from keyface_jax.data.pipeline import DataConfig, make_loader
    from keyface_jax.sharding import make_mesh
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    mesh = make_mesh({"data": 2, "fsdp": 2})
    cfg = DataConfig(path=folder, global_batch=8, seed=5, min_start={"nsv": 120},
                     group_weights={"a": 1, "b": 1, "c": 1, "nsv": 1})

    def local(batch):  # this process's rows, in global row order
        out = {}
        for key in ("draw_index", "video_index", "start", "latents"):
            shards = sorted(batch[key].addressable_shards, key=lambda s: s.index[0].start)
            rows = {s.index[0].start: np.asarray(s.data) for s in shards}
            out[key] = np.concatenate([rows[r] for r in sorted(rows)]).tolist()
        return out

    loader = make_loader(cfg, mesh)
    batches = [local(next(loader)) for _ in range(4)]
    loader.close()
    fresh = make_loader(cfg, mesh, start=2)
    resumed = [local(next(fresh)) for _ in range(2)]
    fresh.close()
    result = dict(rows=list(process_rows(batch_sharding(mesh), 8)), batches=batches,
                  resumed_equal=resumed == batches[2:])
    with open(os.path.join(workdir, f"process{process_id}.json"), "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _two_process_worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
