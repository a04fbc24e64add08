"""Writing and reading the frame-record TFDS dataset of `keyface_jax.data.schema`, without TF.

A dataset folder holds, per split, ArrayRecord shards `<name>-<split>.array_record-NNNNN-of-NNNNN`
of serialized `tf.train.Example`s (TFDS's own proto, no TensorFlow needed), plus TFDS's
`dataset_info.json` / `features.json`, the video table in `videos.json` and in TFDS's
`metadata.json`. So `tfds.builder_from_directory(folder).as_data_source(split)` reads it, and so
does `tfds.data_source(name, data_dir=...)` when the folder is `<data_dir>/<name>/<version>`.

Latents and audio are stored as raw float32 bytes (`Encoding.BYTES`); `FrameDecoder` parses the
proto directly, ~25× faster than TFDS's generic numpy decoding.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

from keyface_jax.data.schema import TOKENS_PER_FRAME, VIDEO_TABLE, VideoEntry

DATASET_NAME = "keyface_frames"
VERSION = "1.0.0"
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_SUFFIX = "array_record"


def frame_features(latent_shape: Sequence[int], audio_dim: int,
                   frame_shape: Sequence[int] | None = None) -> tfds.features.FeaturesDict:
    """The TFDS features of one frame record; `frame_shape` [H, W, 3] adds the PNG-encoded frame."""
    tensor = lambda shape: tfds.features.Tensor(shape=tuple(shape), dtype=np.float32,
                                                encoding=tfds.features.Encoding.BYTES)
    spec = dict(video_index=tfds.features.Scalar(np.int64),
                frame_index=tfds.features.Scalar(np.int64),
                latent=tensor(latent_shape),
                audio=tensor((TOKENS_PER_FRAME, audio_dim)),
                valence=tfds.features.Scalar(np.float32),
                arousal=tfds.features.Scalar(np.float32))
    if frame_shape is not None:
        spec["frame"] = tfds.features.Image(shape=tuple(frame_shape), encoding_format="png")
    return tfds.features.FeaturesDict(spec)


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image  # only needed when frames are stored
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="png")
    return buf.getvalue()


class _SplitWriter:
    """Streams one split's records into shards of `shard_records`, named once the count is known."""

    def __init__(self, folder: str, name: str, split: str, shard_records: int):
        self.folder, self.name, self.split, self.shard_records = folder, name, split, shard_records
        self.lengths: list[int] = []
        self._writer = None

    def write(self, record: bytes):
        if self._writer is None or self.lengths[-1] == self.shard_records:
            self._close_shard()
            path = os.path.join(self.folder, f".tmp-{self.split}-{len(self.lengths):05d}")
            # group_size:1 makes every record its own chunk: one random read decodes one record
            self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
            self.lengths.append(0)
        self._writer.write(record)
        self.lengths[-1] += 1

    def _close_shard(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self) -> tuple[int, list[str]]:
        self._close_shard()
        n, paths = len(self.lengths), []
        for i in range(n):
            final = os.path.join(self.folder,
                                 f"{self.name}-{self.split}.{_SUFFIX}-{i:05d}-of-{n:05d}")
            os.replace(os.path.join(self.folder, f".tmp-{self.split}-{i:05d}"), final)
            paths.append(final)
        return sum(os.path.getsize(p) for p in paths), paths


def write_frame_dataset(folder: str, videos: Iterable[tuple[VideoEntry, Mapping[str, Any]]], *,
                        latent_shape: Sequence[int], audio_dim: int,
                        frame_shape: Sequence[int] | None = None, shard_records: int = 2048,
                        name: str = DATASET_NAME, description: str = "",
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
    if os.path.exists(os.path.join(folder, "dataset_info.json")):
        if not overwrite:
            raise FileExistsError(f"{folder} already holds a dataset (overwrite=True replaces it)")
        for f in os.listdir(folder):
            if f".{_SUFFIX}-" in f or f in ("dataset_info.json", "features.json", "metadata.json",
                                             VIDEO_TABLE):
                os.remove(os.path.join(folder, f))
    os.makedirs(folder, exist_ok=True)
    features = frame_features(latent_shape, audio_dim, frame_shape)
    writers: dict[str, _SplitWriter] = {}
    table: list[VideoEntry] = []
    for entry, arrays in videos:
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
        if entry.split not in writers:
            writers[entry.split] = _SplitWriter(folder, name, entry.split, shard_records)
        writer = writers[entry.split]
        entry = dataclasses.replace(entry, first_record=sum(writer.lengths))
        for t in range(n):
            record = dict(video_index=len(table), frame_index=t,
                          latent=np.asarray(arrays["latent"][t], np.float32),
                          audio=np.asarray(arrays["audio"][t], np.float32),
                          valence=np.float32(arrays["valence"][t]),
                          arousal=np.float32(arrays["arousal"][t]))
            if frame_shape is not None:
                frame = arrays["frame"][t]
                record["frame"] = frame if isinstance(frame, bytes) else encode_png(frame)
            writer.write(features.serialize_example(record))
        table.append(entry)
    if not writers:
        raise ValueError("write_frame_dataset: no videos")

    split_infos = []
    for split, writer in sorted(writers.items()):
        num_bytes, _ = writer.finish()
        template = tfds.core.ShardedFileTemplate(data_dir=folder, template=_TEMPLATE,
                                                 dataset_name=name, split=split,
                                                 filetype_suffix=_SUFFIX)
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=list(writer.lengths),
                                               num_bytes=num_bytes, filename_template=template))
    rows = [dataclasses.asdict(e) for e in table]
    with open(os.path.join(folder, VIDEO_TABLE), "w") as f:
        json.dump(rows, f, indent=1)
    # check_data=False: TFDS's check reads through tf.data, which needs TensorFlow
    tfds.folder_dataset.write_metadata(
        data_dir=folder, features=features, split_infos=split_infos, filename_template=_TEMPLATE,
        check_data=False, description=description or "KeyFace frame records (one per 25 fps frame)",
        metadata=tfds.core.MetadataDict(videos=rows))
    return table


def read_video_table(folder: str) -> list[VideoEntry]:
    with open(os.path.join(folder, VIDEO_TABLE)) as f:
        return [VideoEntry(**row) for row in json.load(f)]


def open_frame_source(folder: str, split: str):
    """Random access to a split's raw records (serialized Examples): src[i], src.__getitems__."""
    builder = tfds.builder_from_directory(folder)
    return builder.as_data_source(split=split,
                                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)


class FrameDecoder:
    """Parses serialized frame records into numpy, reading only `fields`.

    Shapes and encodings come from the dataset's TFDS features, so a dataset written with plain
    (non-bytes) tensor encoding decodes too.
    """

    def __init__(self, features: tfds.features.FeaturesDict, fields: Sequence[str]):
        missing = [f for f in fields if f not in features]
        if missing:
            raise ValueError(f"dataset has no {missing} feature(s); it has "
                             f"{sorted(features.keys())}")
        self.fields = tuple(fields)
        self._specs = {}
        for f in self.fields:
            feat = features[f]
            if isinstance(feat, tfds.features.Image):
                self._specs[f] = ("image", feat.shape, None)
            else:
                info = feat.get_tensor_info()
                encoding = getattr(feat, "_encoding", tfds.features.Encoding.NONE)
                kind = {tfds.features.Encoding.BYTES: "bytes",
                        tfds.features.Encoding.ZLIB: "zlib"}.get(encoding, "list")
                self._specs[f] = (kind, tuple(info.shape), np.dtype(info.np_dtype))

    def __call__(self, serialized: bytes) -> dict[str, np.ndarray]:
        feature = tf_example_pb2.Example.FromString(serialized).features.feature
        out = {}
        for name, (kind, shape, dtype) in self._specs.items():
            value = feature[name]
            if kind in ("bytes", "zlib"):
                data = value.bytes_list.value[0]
                data = zlib.decompress(data) if kind == "zlib" else data
                out[name] = np.frombuffer(data, dtype).reshape(shape)
            elif kind == "list":
                values = value.int64_list.value if dtype.kind in "iub" else value.float_list.value
                out[name] = np.asarray(values, dtype).reshape(shape)
            else:
                out[name] = _decode_png(value.bytes_list.value[0], shape)
        return out


def _decode_png(data: bytes, shape) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB"))
    if any(want not in (None, got) for want, got in zip(shape, array.shape)):
        raise ValueError(f"stored frame is {array.shape}, the features say {shape}")
    return array
