"""Logical axis names → device mesh: the mesh from the topology, one rules table for parameters and
activations, and shardings for abstract model state.

Every parameter is created with logical axis names (`out_sharding` metadata, see
`keyface_jax.models.layers`); activations carry logical names at block boundaries
(`keyface_jax.activation_sharding`). One rules table maps each logical name onto zero or more mesh
axes. Its default lives in the config data (`configs/axis_rules.py: LOGICAL_AXIS_RULES`, copied into
`config.mesh.rules`, overridable per entry: `--config.mesh.rules.embed=fsdp,context`).

Mesh axes, outermost first (ordered by increasing communication, as `mesh_utils` expects):
- `data`: pure data parallelism (parameters replicated);
- `fsdp`: data parallelism with parameters and optimizer moments sharded (ZeRO-3);
- `context`: a clip's spatial tokens split over devices (global batch smaller than the devices);
- `tensor`: attention heads and MLP widths split over devices.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from configs.axis_rules import LOGICAL_AXIS_RULES as _DEFAULT_TABLE

MESH_AXES = ("data", "fsdp", "context", "tensor")

# A parsed rules table: (logical name, mesh axes) pairs; () replicates.
Rules = tuple[tuple[str, tuple[str, ...]], ...]


def _axes(value) -> tuple[str, ...]:
    """'' / None → (); 'fsdp' → ('fsdp',); 'data,fsdp' or ('data', 'fsdp') → ('data', 'fsdp')."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(a.strip() for a in value.split(",") if a.strip())
    return tuple(value)


def parse_rules(table: Mapping | Iterable) -> Rules:
    """A rules table from config data ({name: 'axis' | 'a,b' | ''}) or (name, axes) pairs.
    Raises ValueError naming the entry when it maps to an unknown mesh axis."""
    items = table.items() if hasattr(table, "items") else table
    rules = []
    for name, value in items:
        axes = _axes(value)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"logical axis rule {name!r} → {value!r}: unknown mesh axes {unknown}; "
                             f"mesh axes are {MESH_AXES}")
        rules.append((str(name), axes))
    return tuple(rules)


DEFAULT_RULES: Rules = parse_rules(_DEFAULT_TABLE)

# Arrays smaller than this stay replicated: sharding them saves nothing and costs collectives.
MIN_SHARDED_BYTES = 64 * 1024


def rules_from_config(mesh_cfg) -> Rules:
    """The rules of `config.mesh.rules` (the default table when the section has none)."""
    table = mesh_cfg.get("rules") if hasattr(mesh_cfg, "get") else None
    try:
        return parse_rules(table) if table else DEFAULT_RULES
    except ValueError as e:
        raise ValueError(f"config.mesh.rules: {e}") from None


def _resolve_sizes(shape: Mapping, num_devices: int, what: str) -> list[int]:
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh {what}{dict(zip(MESH_AXES, sizes))}: only one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh {what}{dict(zip(MESH_AXES, sizes))}: {num_devices} devices do not "
                             f"divide by {known}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {what}{dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                         f"{num_devices} are present")
    return sizes


def make_mesh(shape: Mapping, devices: Sequence | None = None) -> Mesh:
    """The device mesh of a `config.mesh`-like mapping, laid out on the physical topology.

    `shape` holds per-slice (ICI) sizes for MESH_AXES (missing = 1, one may be -1: the devices left
    over) and optionally `dcn`: sizes across slices (multi-slice TPU jobs, or processes where
    devices carry no slice index), e.g. {"fsdp": -1, "dcn": {"data": 2}}. Single-slice meshes come
    from `jax.make_mesh` (topology-aware device order on TPU); multi-slice ones from
    `mesh_utils.create_hybrid_device_mesh`, so FSDP gathers stay inside a slice and only the dcn axes
    cross slices. Works on abstract TPU topology devices too (ahead-of-time compilation).
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn_cfg = shape.get("dcn") or {}
    dcn = [int(dcn_cfg.get(a, 1)) for a in MESH_AXES]
    if any(s < 1 for s in dcn):
        raise ValueError(f"mesh dcn {dict(zip(MESH_AXES, dcn))}: sizes must be >= 1")
    slices = math.prod(dcn)
    if len(devices) % slices:
        raise ValueError(f"mesh dcn {dict(zip(MESH_AXES, dcn))}: {len(devices)} devices do not split "
                         f"into {slices} slices")
    ici = _resolve_sizes(shape, len(devices) // slices, "" if slices == 1 else "per slice ")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        return jax.make_mesh(tuple(ici), MESH_AXES, axis_types=axis_types, devices=devices)
    by_process = not hasattr(devices[0], "slice_index")
    try:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
    except ValueError as e:
        granule = "processes" if by_process else "slices"
        raise ValueError(f"mesh {dict(zip(MESH_AXES, ici))} × dcn {dict(zip(MESH_AXES, dcn))}: the "
                         f"devices' {granule} do not form this grid: {e}") from None
    total = [i * d for i, d in zip(ici, dcn)]
    return Mesh(np.asarray(grid).reshape(total), MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Iterable[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec of logical dim names (None = replicated). A mesh axis shards one dim at most:
    a later dim naming an axis already used stays unsharded on it."""
    table = dict(parse_rules(rules))
    spec, used = [], set()
    for name in names:
        axes = table.get(name, ()) if name is not None else ()
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def _as_tuple(axes) -> tuple[str, ...]:
    """A PartitionSpec entry (None, 'fsdp' or ('data', 'fsdp')) as a tuple of mesh axes."""
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def axes_size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in _as_tuple(axes))


def _check_heads(name: str, var, spec, mesh: Mesh) -> None:
    """Tensor parallelism must not split inside an attention head: the "heads" dim of q/k/v/out
    kernels (heads × dim_head wide) divides over its mesh axes only if the head count does."""
    heads = var.get_metadata().get("num_heads")
    names = var.get_metadata().get("out_sharding")
    if heads is None:
        return
    for logical, axes in zip(names, map(_as_tuple, spec)):
        size = axes_size(mesh, axes)
        if logical == "heads" and heads % size:
            raise ValueError(f"parameter {name} {tuple(var.shape)}: its layer's {heads} attention heads "
                             f"do not split over mesh axes {axes} of size {size} (mesh "
                             f"{dict(mesh.shape)}); tensor parallelism needs heads % tensor == 0: "
                             "change the mesh or the 'heads' rule")


def param_shardings(abstract_state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES,
                    min_bytes: int = MIN_SHARDED_BYTES) -> nnx.State:
    """NamedShardings for every leaf of an abstract parameter State.

    Raises ValueError naming the parameter, its shape and the mesh when a sharded dimension does not
    divide by its mesh axes, when an attention layer's heads do not divide over the axes of its
    "heads" dim, or when a parameter carries no logical names.
    """
    out = []
    for path, var in nnx.to_flat_state(abstract_state):
        name = ".".join(map(str, path))
        names = var.get_metadata().get("out_sharding")
        if names is None or len(names) != len(var.shape):
            raise ValueError(f"parameter {name} {tuple(var.shape)} has no logical axis names")
        spec = logical_to_spec(names, rules)
        _check_heads(name, var, spec, mesh)
        nbytes = int(np.prod(var.shape)) * np.dtype(var.dtype).itemsize
        if nbytes < min_bytes:
            spec = PartitionSpec()
        for dim, axes in zip(var.shape, map(_as_tuple, spec)):
            size = axes_size(mesh, axes)
            if dim % size:
                raise ValueError(f"parameter {name} {tuple(var.shape)}: dimension {dim} does not divide "
                                 f"over mesh axes {axes} of size {size} (mesh {dict(mesh.shape)}); change "
                                 "the mesh shape or the logical axis rules")
        out.append((path, var.replace(NamedSharding(mesh, spec))))
    return nnx.from_flat_state(out)
