"""Grain loaders for both stages: seeded clip batches delivered as global `jax.Array`s on the mesh.

    loader = make_loader(DataConfig(path=..., kind="keyframe", global_batch=8), mesh)
    batch = next(loader)        # dict of jax.Arrays, batch axis sharded over ("data", "fsdp")

Pipeline: `MapDataset.range(batches)` → `BatchReader` (draws, record reads, decoding; numpy) →
`to_iter_dataset` (reader threads) → optional `mp_prefetch` (worker processes) → a CPU buffer →
`jax.make_array_from_process_local_data` → a device buffer. Batch j is a pure function of (seed, j):
the order does not depend on process, worker or thread counts, and the iterator state is just "next
batch" (plus worker bookkeeping), saved per process with Grain's Orbax handler:

    save = grain.checkpoint.CheckpointSave(loader)        # restore: CheckpointRestore(loader)
    mngr.save(step, args=ocp.args.Composite(state=..., data=save))

A restore needs the same config (seed, batch, split, worker_count) and process count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding

from keyface_jax.data import tfds_io
from keyface_jax.data.schema import CLIP_FRAMES
from keyface_jax.data.transforms import STRIDES, BatchReader, ClipSampler
from keyface_jax.sharding import logical_to_spec

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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch axis over the data-parallel axes ("act_batch" → ("data", "fsdp")), rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",)))


def process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """The contiguous batch rows [lo, hi) this process's devices hold under `sharding`."""
    axes, mesh = _batch_axes(sharding), sharding.mesh
    size = int(np.prod([mesh.shape[a] for a in axes]))
    if global_batch % size:
        raise ValueError(f"global batch {global_batch} does not divide over the batch axes {axes} "
                         f"of size {size} (mesh {dict(mesh.shape)})")
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    ranges = sorted({(s.start or 0, global_batch if s.stop is None else s.stop)
                     for (s,) in index_map.values()})
    lo, hi = ranges[0][0], ranges[-1][1]
    if sum(b - a for a, b in ranges) != hi - lo:
        raise ValueError(f"this process's batch rows {ranges} are not contiguous; order the mesh's "
                         "devices by process (jax.devices() order does)")
    return lo, hi


def _batch_axes(sharding: NamedSharding) -> tuple[str, ...]:
    axes = sharding.spec[0] if len(sharding.spec) else None
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def make_sampler(config: DataConfig) -> ClipSampler:
    return ClipSampler(tfds_io.read_video_table(config.path), config.kind, split=config.split,
                       group_weights=config.group_weights, min_start=config.min_start,
                       include_last_window=config.include_last_window, seed=config.seed,
                       clip_frames=config.clip_frames)


def host_dataset(config: DataConfig, rows: tuple[int, int] | None = None) -> grain.IterDataset:
    """Numpy batches of rows [lo, hi) of each global batch (default: all rows)."""
    rows = rows or (0, config.global_batch)
    if not 0 <= rows[0] < rows[1] <= config.global_batch:
        raise ValueError(f"rows {rows} outside a global batch of {config.global_batch}")
    reader = BatchReader(config.path, make_sampler(config), config.global_batch, rows,
                         config.pixel_frames)
    batches = ENDLESS if config.num_batches is None else int(config.num_batches)
    threads = int(config.read_threads)
    ds = grain.MapDataset.range(batches).map(reader).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 1)))
    if config.worker_count > 0:
        # Grain 0.2.18 reads absl flags when starting workers; outside absl.app (tests, notebooks,
        # benchmarks) nobody parsed them, so take every flag's default.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(config.worker_count), per_worker_buffer_size=int(config.worker_buffer)))
    return ds


def make_dataset(config: DataConfig, mesh: Mesh) -> grain.IterDataset:
    """Global batches: dicts of `jax.Array`s [global_batch, ...] on `batch_sharding(mesh)`."""
    sharding = batch_sharding(mesh)
    lo, hi = process_rows(sharding, config.global_batch)
    ds = host_dataset(config, (lo, hi))

    def to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {k: jax.make_array_from_process_local_data(
                    sharding, v, (config.global_batch,) + v.shape[1:]) for k, v in batch.items()}

    # Grain's own device_put recipe: a CPU buffer, the copy, a device buffer; each buffer keeps the
    # state of what the caller has consumed, so a saved state never counts prefetched batches.
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(config.prefetch))
    ds = ds.map(to_global)
    return grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=int(config.device_prefetch))


def make_host_loader(config: DataConfig, mesh: Mesh) -> grain.DatasetIterator:
    """This process's rows of every global batch as numpy, behind a CPU prefetch buffer, for a
    caller that builds the global arrays itself (`jax.make_array_from_process_local_data`)."""
    ds = host_dataset(config, process_rows(batch_sharding(mesh), config.global_batch))
    return iter(grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=int(config.prefetch)))


def make_loader(config: DataConfig, mesh: Mesh) -> grain.DatasetIterator:
    """An iterator of global batches; get_state/set_state and Grain's Orbax handler resume it."""
    return iter(make_dataset(config, mesh))


def save_state(directory: str, loader: grain.DatasetIterator) -> None:
    """Saves the loader's position (one JSON file per process) with Orbax and Grain's handler."""
    import orbax.checkpoint as ocp
    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
        ckptr.save(directory, args=grain.checkpoint.CheckpointSave(loader))


def restore_state(directory: str, loader: grain.DatasetIterator) -> Any:
    """Moves `loader` (same config) to the position saved in `directory`."""
    import orbax.checkpoint as ocp
    with ocp.Checkpointer(grain.checkpoint.CheckpointHandler()) as ckptr:
        return ckptr.restore(directory, args=grain.checkpoint.CheckpointRestore(loader))
