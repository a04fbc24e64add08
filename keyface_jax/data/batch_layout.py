"""How a global training batch lies on the mesh: its sharding, the rows each process holds, and
host rows → global `jax.Array`s. The one definition of each, for every batch source (prepared
datasets, synthetic batches, autoencoder video frames) and for the trainer.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from keyface_jax.sharding import logical_to_spec


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch axis over the data-parallel axes (the "act_batch" rule), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("act_batch",)))


def _batch_axes(sharding: NamedSharding) -> tuple[str, ...]:
    axes = sharding.spec[0] if len(sharding.spec) else None
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """The contiguous rows [lo, hi) of a global batch that this process's devices hold under
    `sharding`: what this process reads. Derived from the sharding, so any mesh layout works
    as long as each process's rows are contiguous."""
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


def to_global(local: Mapping[str, np.ndarray], sharding: NamedSharding,
              global_batch: int | None = None) -> dict[str, jax.Array]:
    """This process's rows (or, for a replicated sharding, the whole arrays) → global arrays.
    `global_batch` gives the global leading size; None infers it from the sharding."""
    def put(value):
        value = np.asarray(value)
        shape = None if global_batch is None else (global_batch,) + value.shape[1:]
        return jax.make_array_from_process_local_data(sharding, value, shape)
    return {k: put(v) for k, v in local.items()}
