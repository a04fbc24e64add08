"""Shards of the frame-record dataset, written per host and merged into one TFDS dataset.

Record format, features and video table are `keyface_jax.data.tfds_io`'s (the loaders read them
with it); this module adds what that single-writer helper cannot do: a host writes the records of
its slice of the videos into its own shard files, and the merge renames every host's shards into
TFDS's global numbering `{name}-{split}.array_record-{i:05d}-of-{n:05d}` (renames only: no record
is copied) and writes dataset_info.json / features.json / metadata.json.

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
from collections.abc import Mapping, Sequence

from keyface_jax.data import tfds_io

ARRAY_RECORD_OPTIONS = "group_size:1"   # one record per chunk: one read per random access


@dataclasses.dataclass
class Shard:
    filename: str
    num_records: int
    num_bytes: int


class ShardWriter:
    """Writes records into `folder/{prefix}-{k:05d}` ArrayRecord files, starting a new file once
    one holds `max_bytes`. A file is written under a temporary name and renamed when closed, so a
    file under its final name is always complete."""

    def __init__(self, folder: str, prefix: str, max_bytes: int):
        self.folder, self.prefix, self.max_bytes = folder, prefix, max_bytes
        self.shards: list[Shard] = []
        self._writer = None

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
        if self._bytes >= self.max_bytes:
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
