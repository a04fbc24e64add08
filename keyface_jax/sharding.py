"""Logical axis names → device mesh: one rules table, and shardings for abstract model state.

Every parameter is created with logical axis names (`out_sharding` metadata, see
`keyface_jax.models.layers`). A rules table maps each logical name onto zero or more mesh axes; FSDP
is "shard the big dimension of every weight over the `fsdp` axis".
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). Weights: the input/"embed" side and conv outputs go to
# fsdp, MLP and attention-head widths to tensor parallelism; norms and small vectors replicate.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
)

# Arrays smaller than this stay replicated: sharding them saves nothing and costs collectives.
MIN_SHARDED_BYTES = 64 * 1024


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes MESH_AXES; a size of -1 takes the devices left over by the others."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh {shape}: only one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if unknown:
        if len(devices) % known:
            raise ValueError(f"mesh {shape}: {len(devices)} devices do not divide by {known}")
        sizes[unknown[0]] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"{len(devices)} are present")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Iterable[str | None], rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    table = dict(rules)
    spec, used = [], set()
    for name in names:
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one dim at most
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules=LOGICAL_AXIS_RULES,
                    min_bytes: int = MIN_SHARDED_BYTES) -> nnx.State:
    """NamedShardings for every leaf of an abstract parameter State.

    Raises ValueError naming the parameter, its shape and the mesh when a sharded dimension does not
    divide by its mesh axes, or when a parameter carries no logical names.
    """
    out = []
    for path, var in nnx.to_flat_state(abstract_state):
        name = ".".join(map(str, path))
        names = var.get_metadata().get("out_sharding")
        if names is None or len(names) != len(var.shape):
            raise ValueError(f"parameter {name} {tuple(var.shape)} has no logical axis names")
        spec = logical_to_spec(names, rules)
        nbytes = int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize
        if nbytes < min_bytes:
            spec = PartitionSpec()
        for dim, axes in zip(var.shape, spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if dim % size:
                raise ValueError(f"parameter {name} {tuple(var.shape)}: dimension {dim} does not divide "
                                 f"over mesh axes {axes} of size {size} (mesh {dict(mesh.shape)}); change "
                                 "the mesh shape or the logical axis rules")
        out.append((path, var.replace(NamedSharding(mesh, spec))))
    return nnx.from_flat_state(out)
