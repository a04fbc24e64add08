"""The trainer's entry point: a data iterator from the run's ml_collections config.

    data = make_train_iterator(config, mesh)                      # host-local numpy rows
    data = make_train_iterator(config, mesh, global_arrays=True)  # jax.Arrays, device prefetch

Fields read: config.model.kind, config.train.batch_size, config.num_frames, config.seed, and
config.data.{path, group_weights, workers, prefetch} plus, when present, config.data.{split, seed,
min_start, include_last_window, read_threads, worker_buffer, device_prefetch, pixel_frames}. Pixel
frames default to `config.objective.pixel_frames` per clip when the keyframe objective has pixel
losses (pixel_weight > 0), else none.
"""

from __future__ import annotations

import grain
from jax.sharding import Mesh

from keyface_jax.data.pipeline import DataConfig, make_host_loader, make_loader


def data_config(config) -> DataConfig:
    data, kind = config.data, config.model.kind
    objective = config.get("objective")
    pixel = 0
    if (kind == "keyframe" and objective is not None and objective.get("pixel_weight", 0) > 0
            and tuple(objective.get("pixel_losses", ()))):
        pixel = int(objective.get("pixel_frames", 1))
    return DataConfig(
        path=data.path, kind=kind, split=data.get("split", "train"),
        global_batch=int(config.train.batch_size), seed=int(data.get("seed", config.seed)),
        group_weights=data.get("group_weights"), min_start=data.get("min_start", 0),
        include_last_window=bool(data.get("include_last_window", False)),
        clip_frames=int(config.get("num_frames", 14)),
        pixel_frames=int(data.get("pixel_frames", pixel)),
        worker_count=int(data.get("workers", 0)), worker_buffer=int(data.get("worker_buffer", 2)),
        read_threads=int(data.get("read_threads", 2)), prefetch=int(data.get("prefetch", 2)),
        device_prefetch=int(data.get("device_prefetch", 2)))


def make_train_iterator(config, mesh: Mesh, *,
                        global_arrays: bool = False) -> grain.DatasetIterator:
    """Endless seeded training batches; Grain's Orbax handler saves and restores its position."""
    cfg = data_config(config)
    return make_loader(cfg, mesh) if global_arrays else make_host_loader(cfg, mesh)
