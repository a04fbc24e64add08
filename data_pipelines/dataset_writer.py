"""Writing the frame-record dataset (`keyface_jax.data.schema`): shards, their merge into one TFDS
dataset, its metadata, and `write_frame_dataset` for (entry, arrays) pairs in memory.

Record format and features are `keyface_jax.data.tfds_io`'s (the loaders read them with it). A
host writes the records of its slice of the videos into its own shard files; the merge renames
every host's shards into TFDS's global numbering `{name}-{split}.array_record-{i:05d}-of-{n:05d}`
(renames only: no record is copied) and writes dataset_info.json / features.json / metadata.json.
`write_frame_dataset` is the same path for one writer (tests, benchmarks, small datasets).

Writing these files ourselves instead of through a TFDS builder (what we found, tfds 4.9.10 without
TensorFlow): `tfds.core.DatasetInfo.write_to_directory` and the vendored tf.Example protos need no
TensorFlow, so `tfds.builder_from_directory(out).as_data_source()` reads the result; a
GeneratorBasedBuilder(file_format='array_record') also runs TF-free but owns the shard layout and
record order and cannot merge several hosts' outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from keyface_jax.data import tfds_io
from keyface_jax.data.schema import VIDEO_TABLE, VideoEntry
from keyface_jax.media.face_crop import png_bytes

ARRAY_RECORD_OPTIONS = "group_size:1"   # one record per chunk: one read per random access


@dataclasses.dataclass
class Shard:
    filename: str
    num_records: int
    num_bytes: int


class ShardWriter:
    """Writes records into `folder/{prefix}-{k:05d}` ArrayRecord files, starting a new file once
    one holds `max_bytes` (or `max_records`). A file is written under a temporary name and renamed
    when closed, so a file under its final name is always complete."""

    def __init__(self, folder: str, prefix: str, max_bytes: int, max_records: int = 0):
        self.folder, self.prefix, self.max_bytes = folder, prefix, max_bytes
        self.max_records = max_records
        self.shards: list[Shard] = []
        self._writer = None

    @property
    def records_written(self) -> int:
        return sum(s.num_records for s in self.shards) + (self._count if self._writer else 0)

    def write(self, record: bytes) -> None:
        if self._writer is None:
            from array_record.python.array_record_module import ArrayRecordWriter
            self._name = f"{self.prefix}-{len(self.shards):05d}"
            self._tmp = os.path.join(self.folder, self._name + ".tmp")
            self._writer = ArrayRecordWriter(self._tmp, ARRAY_RECORD_OPTIONS)
            self._count, self._bytes = 0, 0
        self._writer.write(record)
        self._count += 1
        self._bytes += len(record)
        if self._bytes >= self.max_bytes or self._count == self.max_records:
            self._finish()

    def _finish(self) -> None:
        self._writer.close()
        self._writer = None
        final = os.path.join(self.folder, self._name)
        os.replace(self._tmp, final)
        self.shards.append(Shard(self._name, self._count, os.path.getsize(final)))

    def close(self) -> list[Shard]:
        if self._writer is not None:
            self._finish()
        return self.shards


def shard_filename(dataset: str, split: str, index: int, count: int) -> str:
    """TFDS's default template `{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}`."""
    return f"{dataset}-{split}.array_record-{index:05d}-of-{count:05d}"


def merge_shards(output: str, name: str, host_shards: Sequence[Mapping[str, Sequence[dict]]],
                 host_dirs: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """Moves every host's shards (host order, then shard order) to their global names in
    `output`; returns split → [(num_records, num_bytes)]. Idempotent: a shard already moved by an
    interrupted merge is found under its final name. Stale shards of the dataset are removed."""
    plan, sizes = [], {}
    splits = sorted({s for shards in host_shards for s in shards})
    for split in splits:
        pieces = [(d, s) for d, shards in zip(host_dirs, host_shards) for s in shards.get(split, [])]
        sizes[split] = [(s["num_records"], s["num_bytes"]) for _, s in pieces]
        for i, (folder, s) in enumerate(pieces):
            plan.append((os.path.join(folder, s["filename"]),
                         os.path.join(output, shard_filename(name, split, i, len(pieces)))))
    wanted = {os.path.basename(dst) for _, dst in plan}
    for f in os.listdir(output):
        if f.startswith(f"{name}-") and ".array_record-" in f and f not in wanted:
            os.remove(os.path.join(output, f))
    for src, dst in plan:
        if os.path.exists(src):
            os.replace(src, dst)
        elif not os.path.exists(dst):
            raise FileNotFoundError(f"shard {src} is missing (and {dst} does not exist)")
    return sizes


def write_dataset_info(output: str, *, name: str, features, sizes: Mapping[str, Sequence],
                       metadata: Mapping, description: str) -> None:
    """dataset_info.json, features.json and metadata.json for the merged shards."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_info, file_adapters, naming, splits, utils
    infos = []
    for split, shards in sizes.items():
        template = naming.ShardedFileTemplate(
            data_dir=output, template=naming.DEFAULT_FILENAME_TEMPLATE, dataset_name=name,
            split=split, filetype_suffix="array_record")
        infos.append(splits.SplitInfo(name=split, shard_lengths=[int(n) for n, _ in shards],
                                      num_bytes=int(sum(b for _, b in shards)),
                                      filename_template=template))
    identity = dataset_info.DatasetIdentity(name=name, version=utils.Version(tfds_io.VERSION),
                                            data_dir=output, module_name="")
    info = dataset_info.DatasetInfo(builder=identity, features=features, description=description,
                                    metadata=tfds.core.MetadataDict(metadata))
    info.set_file_format(file_adapters.FileFormat.ARRAY_RECORD)
    info.set_splits(splits.SplitDict(infos))
    info.write_to_directory(output)


def frame_records(video_index: int, arrays: Mapping[str, Any], pngs: Sequence[bytes] | None):
    """The record dicts of one video's frames (features of `tfds_io.frame_features`)."""
    for t in range(len(arrays["latent"])):
        record = dict(video_index=video_index, frame_index=t,
                      latent=np.asarray(arrays["latent"][t], np.float32),
                      audio=np.asarray(arrays["audio"][t], np.float32),
                      valence=np.float32(arrays["valence"][t]),
                      arousal=np.float32(arrays["arousal"][t]))
        if pngs is not None:
            record["frame"] = pngs[t]
        yield record


def _check_video(entry: VideoEntry, arrays: Mapping[str, Any], frame_shape) -> None:
    n = int(entry.num_frames)
    lengths = {k: len(arrays[k]) for k in ("latent", "audio", "valence", "arousal")}
    if frame_shape is not None:
        lengths["frame"] = len(arrays["frame"])
    elif "frame" in arrays:
        raise ValueError(f"video {entry.name}: frames given but the dataset has no frame_shape")
    if any(v != n for v in lengths.values()):
        raise ValueError(f"video {entry.name}: num_frames={n} but array lengths are {lengths}")
    if n < 1:
        raise ValueError(f"video {entry.name} has no frames")


def write_frame_dataset(folder: str, videos: Iterable[tuple[VideoEntry, Mapping[str, Any]]], *,
                        latent_shape: Sequence[int], audio_dim: int,
                        frame_shape: Sequence[int] | None = None, shard_records: int = 2048,
                        name: str = tfds_io.DATASET_NAME, description: str = "",
                        overwrite: bool = False) -> list[VideoEntry]:
    """Writes a frame-record dataset (schema.py) into `folder` and returns its video table.

    Args:
      folder: the dataset folder (created). Use `<data_dir>/<name>/<version>` to make it loadable by
        `tfds.data_source(name, data_dir=data_dir)` too.
      videos: (entry, arrays) pairs, streamed one video at a time, in any split order. arrays:
        latent [T, h, w, 4] float32 (diffusion space), audio [T, 2, audio_dim] float32, valence and
        arousal [T] float32, and, iff `frame_shape` is given, frame [T, H, W, 3] uint8 or a length-T
        list of PNG bytes. `entry.num_frames` must equal T; `entry.first_record` is ignored and set
        here (records of a split are numbered in the order its videos arrive).
      latent_shape: [h, w, 4]. audio_dim: features per audio token. frame_shape: [H, W, 3] or None.
      shard_records: records per ArrayRecord shard.
    Returns:
      The video table as written to `videos.json` (video_index = position in this list).
    """
    if os.path.exists(os.path.join(folder, "dataset_info.json")) and not overwrite:
        raise FileExistsError(f"{folder} already holds a dataset (overwrite=True replaces it)")
    staging = os.path.join(folder, "_writing")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    features = tfds_io.frame_features(latent_shape, audio_dim, frame_shape)
    writers: dict[str, ShardWriter] = {}
    table: list[VideoEntry] = []
    for entry, arrays in videos:
        _check_video(entry, arrays, frame_shape)
        writer = writers.setdefault(entry.split, ShardWriter(staging, entry.split, 2 ** 62,
                                                             max_records=shard_records))
        table.append(dataclasses.replace(entry, first_record=writer.records_written))
        pngs = None
        if frame_shape is not None:
            pngs = [f if isinstance(f, bytes) else png_bytes(np.asarray(f, np.uint8)) for f in arrays["frame"]]
        for record in frame_records(len(table) - 1, arrays, pngs):
            writer.write(features.serialize_example(record))
    if not writers:
        raise ValueError("write_frame_dataset: no videos")
    shards = {split: [dataclasses.asdict(s) for s in w.close()] for split, w in writers.items()}
    sizes = merge_shards(folder, name, [shards], [staging])
    shutil.rmtree(staging)
    rows = [dataclasses.asdict(e) for e in table]
    write_json(os.path.join(folder, VIDEO_TABLE), rows)
    write_dataset_info(folder, name=name, features=features, sizes=sizes,
                       metadata=dict(videos=rows),
                       description=description or "KeyFace frame records (one per 25 fps frame)")
    return table


def write_json(path: str, value) -> None:
    """JSON under a temporary name, then renamed: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
