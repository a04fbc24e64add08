"""Grain loaders: seeded batches delivered as global `jax.Array`s on the mesh, prefetched.

    loader = make_loader(DataConfig(path=..., kind="keyframe", global_batch=8), mesh)
    batch = next(loader)        # dict of jax.Arrays, batch axis sharded over ("data", "fsdp")

Pipeline (`batch_dataset` + `device_iterator`, shared by every batch source): `MapDataset.range(
start, …)` → a reader (batch index → this process's rows, numpy; `BatchReader` for prepared
datasets) → `to_iter_dataset` (reader threads) → optional `mp_prefetch` (worker processes) → a CPU
buffer of `prefetch` batches → `batch_layout.to_global` → a buffer of `device_prefetch` batches
already on the devices, so the host-to-device copy of batch j+1 overlaps step j. 0 and 0 make
every batch synchronous (for comparison: benchmarks/prefetch_benchmark.py).

Batch j is a pure function of (seed, j): the order does not depend on process, worker or thread
counts, so a resumed run starts its loader at batch `start` = the restored step and sees exactly
the batches an uninterrupted run would (on any number of processes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import grain
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding

from keyface_jax.data import tfds_io
from keyface_jax.data.batch_layout import batch_sharding, process_rows, to_global
from keyface_jax.data.schema import CLIP_FRAMES
from keyface_jax.data.transforms import STRIDES, BatchReader, ClipSampler

ENDLESS = 2 ** 40  # batches of an endless loader (a finite length keeps a MapDataset indexable)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` config section (plain data; see `DataConfig(**config.data)`).

    path: dataset folder (tfds_io); kind: "keyframe" | "interpolation"; split; global_batch: clips
    per step over all processes; seed; group_weights / min_start / include_last_window: see
    `ClipSampler`; clip_frames: frames per clip (14); pixel_frames: 0 none, −1 all, n > 0 that
    many per clip (see `BatchReader`); num_batches: None for endless; worker_count: Grain worker
    processes (0 = read in this process); worker_buffer: batches each worker keeps ready;
    read_threads: reader threads per process; prefetch: host batches buffered before the device
    copy; device_prefetch: batches buffered on device.
    """

    path: str
    kind: str = "keyframe"
    split: str = "train"
    global_batch: int = 8
    seed: int = 0
    group_weights: Mapping[str, float] | None = None
    min_start: int | Mapping[str, int] = 0
    include_last_window: bool = False
    clip_frames: int = CLIP_FRAMES
    pixel_frames: int = 0
    num_batches: int | None = None
    worker_count: int = 0
    worker_buffer: int = 2
    read_threads: int = 2
    prefetch: int = 2
    device_prefetch: int = 2

    def __post_init__(self):
        for name in ("group_weights", "min_start"):  # ConfigDicts are not Mappings
            value = getattr(self, name)
            if hasattr(value, "to_dict"):
                object.__setattr__(self, name, value.to_dict())
        if not self.group_weights:  # {} as well as None: equal group probabilities
            object.__setattr__(self, "group_weights", None)
        if self.kind not in STRIDES:
            raise ValueError(f"data.kind must be one of {sorted(STRIDES)}, got {self.kind!r}")
        if not -1 <= self.pixel_frames <= self.clip_frames:
            raise ValueError(f"data.pixel_frames must be -1 (all), 0 (none) or "
                             f"1..{self.clip_frames}, got {self.pixel_frames}")
        if self.global_batch < 1:
            raise ValueError(f"data.global_batch must be ≥ 1, got {self.global_batch}")


def make_sampler(config: DataConfig) -> ClipSampler:
    return ClipSampler(tfds_io.read_video_table(config.path), config.kind, split=config.split,
                       group_weights=config.group_weights, min_start=config.min_start,
                       include_last_window=config.include_last_window, seed=config.seed,
                       clip_frames=config.clip_frames)


def batch_dataset(read: Callable[[int], dict], *, start: int = 0, num_batches: int | None = None,
                  read_threads: int = 2, worker_count: int = 0,
                  worker_buffer: int = 2) -> grain.IterDataset:
    """Batches read(start), read(start + 1), … (numpy dicts) as a Grain dataset: `read_threads`
    reader threads, and `worker_count` worker processes when > 0 (`read` must then pickle)."""
    stop = ENDLESS if num_batches is None else int(num_batches)
    threads = int(read_threads)
    ds = grain.MapDataset.range(int(start), stop).map(read).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 1)))
    if worker_count > 0:
        # Grain 0.2.18 reads absl flags when starting workers; outside absl.app (tests, notebooks,
        # benchmarks) nobody parsed them, so take every flag's default.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(worker_count), per_worker_buffer_size=int(worker_buffer)))
    return ds


def device_iterator(host: grain.IterDataset, sharding: NamedSharding, global_batch: int, *,
                    prefetch: int = 2, device_prefetch: int = 2) -> grain.DatasetIterator:
    """Global batches from a dataset of this process's rows: a CPU buffer, the copy to the devices
    (`batch_layout.to_global`), a device buffer (Grain's own device_put recipe). Close it when done."""
    ds = grain.experimental.ThreadPrefetchIterDataset(host, prefetch_buffer_size=int(prefetch))
    ds = ds.map(lambda batch: to_global(batch, sharding, global_batch))
    return iter(grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=int(device_prefetch)))


@dataclasses.dataclass(frozen=True)
class HostRows:
    """Reader of rows [lo, hi) of global batch j of `source` (anything with `global_batch_at(j)`:
    synthetic batches, autoencoder video frames)."""

    source: Any
    rows: tuple[int, int]

    def __call__(self, j: int) -> dict[str, np.ndarray]:
        lo, hi = self.rows
        return {k: v[lo:hi] for k, v in self.source.global_batch_at(int(j)).items()}


def host_dataset(config: DataConfig, rows: tuple[int, int] | None = None,
                 start: int = 0) -> grain.IterDataset:
    """Numpy batches of rows [lo, hi) of each global batch of a prepared dataset (default: all)."""
    rows = rows or (0, config.global_batch)
    if not 0 <= rows[0] < rows[1] <= config.global_batch:
        raise ValueError(f"rows {rows} outside a global batch of {config.global_batch}")
    reader = BatchReader(config.path, make_sampler(config), config.global_batch, rows,
                         config.pixel_frames)
    return batch_dataset(reader, start=start, num_batches=config.num_batches,
                         read_threads=config.read_threads, worker_count=config.worker_count,
                         worker_buffer=config.worker_buffer)


def make_loader(config: DataConfig, mesh: Mesh, start: int = 0) -> grain.DatasetIterator:
    """Global batches start, start + 1, … of a prepared dataset on `batch_sharding(mesh)`."""
    sharding = batch_sharding(mesh)
    host = host_dataset(config, process_rows(sharding, config.global_batch), start)
    return device_iterator(host, sharding, config.global_batch, prefetch=config.prefetch,
                           device_prefetch=config.device_prefetch)


def indexed_loader(source, mesh: Mesh, global_batch: int, *, start: int = 0, read_threads: int = 2,
                   prefetch: int = 2, device_prefetch: int = 2) -> grain.DatasetIterator:
    """Global batches start, start + 1, … of a source with `global_batch_at(j)` (synthetic
    batches, autoencoder video frames), through the same prefetching pipeline."""
    sharding = batch_sharding(mesh)
    rows = process_rows(sharding, global_batch)
    host = batch_dataset(HostRows(source, rows), start=start, read_threads=read_threads)
    return device_iterator(host, sharding, global_batch, prefetch=prefetch,
                           device_prefetch=device_prefetch)
