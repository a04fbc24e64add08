"""Training batches as global `jax.Array`s on the mesh, from a prepared dataset or a synthetic source.

The synthetic source (`config.data.path = "synthetic"`) draws seeded Gaussian latents and audio of
the configured shapes: for benchmarks and for tests of the trainer's mechanics, never for quality.
Both sources expose get_state()/set_state() so checkpoints restore the exact position.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if global_batch % ways or global_batch % jax.process_count():
        raise ValueError(f"config.train.batch_size={global_batch} does not divide over the batch mesh "
                         f"axes {BATCH_AXES} ({ways} ways) and {jax.process_count()} processes")


class IndexedBatches:
    """Host-local slices of global batches where batch j is a pure function of (seed, j): the
    iterator and checkpoint protocol (Grain's orbax handler stores non-Grain iterators' state as
    bytes). Subclasses define `global_batch_at(j)`."""

    def __init__(self, global_batch: int, seed: int):
        self.global_batch, self.seed = global_batch, seed
        per_process = global_batch // jax.process_count()
        self.rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
        self.index = 0

    def global_batch_at(self, j: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = {k: v[self.rows] for k, v in self.global_batch_at(self.index).items()}
        self.index += 1
        return batch

    def get_state(self) -> bytes:
        return json.dumps({"index": self.index, "seed": self.seed}).encode()

    def set_state(self, state: bytes) -> None:
        values = json.loads(state)
        if values["seed"] != self.seed:
            raise ValueError(f"data state of seed {values['seed']} restored into a run of seed {self.seed}")
        self.index = int(values["index"])

    def seek(self, step: int) -> None:
        """Position after `step` batches (batch j of a run is a function of j alone)."""
        self.index = int(step)

    def start_prefetch(self) -> None:  # part of the iterator protocol Grain's handler calls
        pass


class SyntheticBatches(IndexedBatches):
    """Seeded random global batches of a network config's shapes."""

    def __init__(self, net_cfg, global_batch: int, frames: int, seed: int):
        super().__init__(global_batch, seed)
        self.cfg, self.frames = net_cfg, frames

    def global_batch_at(self, j: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, j])
        c, B, T, s = self.cfg, self.global_batch, self.frames, self.cfg.latent_size
        f = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
        batch = dict(latents=f(B, T, s, s, c.latent_channels),
                     audio=f(B, T, c.audio_tokens_per_frame, c.audio_dim))
        if c.kind == "keyframe":
            batch.update(identity=batch["latents"][:, 0], valence=np.tanh(f(B, T)), arousal=np.tanh(f(B, T)))
        else:
            batch.update(first=batch["latents"][:, 0], last=batch["latents"][:, -1])
        return batch


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host-local rows → global arrays laid out over the batch axes of the mesh."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
