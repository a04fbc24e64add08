"""Seeded random training batches of a network config's shapes (`config.data.path = "synthetic"`):
for benchmarks and for tests of the trainer's mechanics, never for quality. Batch j is a pure
function of (seed, j); `data.pipeline.indexed_loader` serves them like a prepared dataset."""

from __future__ import annotations

import numpy as np

from keyface_jax.models.build import input_shapes
from keyface_jax.models.keyface import KeyFaceConfig


class SyntheticBatches:
    """Global batches: latents [B, T, s, s, C] and audio ~ N(0, 1); keyframe: identity =
    latents[:, 0], valence/arousal = tanh(N(0, 1)); interpolation: first/last = latents[:, 0/−1]."""

    def __init__(self, net_cfg: KeyFaceConfig, global_batch: int, frames: int, seed: int):
        self.cfg, self.global_batch, self.frames, self.seed = net_cfg, global_batch, frames, seed

    def global_batch_at(self, j: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, j])
        shapes = input_shapes(self.cfg, self.global_batch, self.frames)
        f = lambda shape: rng.standard_normal(shape, dtype=np.float32)
        latents = f(shapes["x"])
        batch = dict(latents=latents, audio=f(shapes["audio"]))
        if self.cfg.kind == "keyframe":
            batch.update(identity=latents[:, 0], valence=np.tanh(f(shapes["valence"])),
                         arousal=np.tanh(f(shapes["arousal"])))
        else:
            batch.update(first=latents[:, 0], last=latents[:, -1])
        return batch
