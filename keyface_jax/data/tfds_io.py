"""Reading the frame-record TFDS dataset of `keyface_jax.data.schema`, without TF (its features
are defined here; `data_pipelines.dataset_writer` writes datasets with them).

A dataset folder holds, per split, ArrayRecord shards `<name>-<split>.array_record-NNNNN-of-NNNNN`
of serialized `tf.train.Example`s (TFDS's own proto, no TensorFlow needed), plus TFDS's
`dataset_info.json` / `features.json`, the video table in `videos.json` and in TFDS's
`metadata.json`. So `tfds.builder_from_directory(folder).as_data_source(split)` reads it, and so
does `tfds.data_source(name, data_dir=...)` when the folder is `<data_dir>/<name>/<version>`.

Latents and audio are stored as raw float32 bytes (`Encoding.BYTES`); `FrameDecoder` parses the
proto directly, ~25× faster than TFDS's generic numpy decoding.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from keyface_jax.data.schema import TOKENS_PER_FRAME, VIDEO_TABLE, VideoEntry

DATASET_NAME = "keyface_frames"
VERSION = "1.0.0"


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
