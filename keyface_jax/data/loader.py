"""The trainer's batches from its ml_collections config: global, prefetched `jax.Array` batches
from a prepared dataset or, for `config.data.path = "synthetic"`, seeded random ones.

    data = train_batches(config, mesh, start=step)   # batch j is the same whatever `start`

`config.data` keys are the `DataConfig` fields of the same names (path, group_weights,
worker_count, worker_buffer, read_threads, prefetch, device_prefetch, and optionally split, seed,
min_start, include_last_window, pixel_frames); kind, global_batch and clip_frames come from
config.model.kind, config.train.batch_size and config.num_frames. Pixel frames default to
`config.objective.pixel_frames` per clip when the keyframe objective has pixel losses
(pixel_weight > 0), else none.
"""

from __future__ import annotations

import dataclasses

import grain
from jax.sharding import Mesh

from keyface_jax.data.pipeline import DataConfig, indexed_loader, make_loader
from keyface_jax.data.schema import require_local

# DataConfig fields that the run config sets elsewhere, not in config.data.
_DERIVED = ("kind", "global_batch", "clip_frames", "num_batches")


def data_config(config) -> DataConfig:
    """`config.data` → DataConfig, the same names; an unknown key is an error."""
    fields = {f.name for f in dataclasses.fields(DataConfig)} - set(_DERIVED)
    unknown = sorted(set(config.data) - fields)
    if unknown:
        raise ValueError(f"config.data: unknown keys {unknown}; known: {sorted(fields)}")
    values = dict(config.data)
    kind = config.model.kind
    objective = config.get("objective")
    if "pixel_frames" not in values:
        values["pixel_frames"] = 0
        if (kind == "keyframe" and objective is not None and objective.get("pixel_weight", 0) > 0
                and tuple(objective.get("pixel_losses", ()))):
            values["pixel_frames"] = int(objective.get("pixel_frames", 1))
    values.setdefault("seed", config.seed)
    return DataConfig(kind=kind, global_batch=int(config.train.batch_size),
                      clip_frames=int(config.get("num_frames", 14)), **values)


def train_batches(config, mesh: Mesh, start: int = 0) -> grain.DatasetIterator:
    """Endless global batches start, start + 1, … for the diffusion trainer (close when done)."""
    cfg = data_config(config)
    if not cfg.path:
        raise ValueError("config.data.path is empty: give a prepared dataset folder "
                         "(python -m data_pipelines.prepare) or 'synthetic'")
    if cfg.path != "synthetic":
        require_local(cfg.path, "config.data.path")
        return make_loader(cfg, mesh, start)
    from keyface_jax.config_lib import network_config
    from keyface_jax.data.synthetic_batches import SyntheticBatches
    source = SyntheticBatches(network_config(config.model), cfg.global_batch, cfg.clip_frames,
                              config.seed)
    return indexed_loader(source, mesh, cfg.global_batch, start=start,
                          read_threads=cfg.read_threads, prefetch=cfg.prefetch,
                          device_prefetch=cfg.device_prefetch)
