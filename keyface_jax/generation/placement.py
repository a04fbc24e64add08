"""Where generation's weights live: in the networks' compute dtype, laid out on a device mesh by the
logical-axis rules the trainer uses.

Sampling needs no fp32 master copy, so a network whose config computes in bfloat16 keeps its
weights in bfloat16 too (half the memory of the fp32 checkpoint). On a mesh with an `fsdp` axis the
weights are FSDP-sharded as in training (each device holds 1/fsdp of every large weight; XLA gathers
a layer's weights where it runs), so keyframe + two interpolation networks need not fit on every
device; `data` (and `fsdp`) split the clips of a batch. Small arrays and the autoencoder stay
replicated (`sharding.MIN_SHARDED_BYTES`; the decoder is a few hundred MB).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from keyface_jax.sharding import DEFAULT_RULES, Rules, axes_size, make_mesh, param_shardings


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,fsdp=-1' → {'data': 2, 'fsdp': -1}; '' → {'data': -1} (clips over all devices)."""
    if not spec:
        return {"data": -1}
    sizes = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {spec!r}: give axis=size pairs, e.g. data=1,fsdp=-1")
        sizes[name.strip()] = int(value)
    return sizes


def generation_mesh(spec: str, devices=None) -> Mesh:
    """The mesh of `--mesh` over this process's devices (generation runs per host)."""
    try:
        return make_mesh(parse_mesh(spec), devices if devices is not None else jax.local_devices())
    except ValueError as e:
        raise ValueError(f"--mesh {spec!r}: {e}") from None


def batch_ways(sharding: NamedSharding) -> int:
    """How many ways a batch laid out by `sharding` splits (batch sizes round up to a multiple)."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    return axes_size(sharding.mesh, (axes,) if isinstance(axes, str) else tuple(axes or ()))


def cast_floats(state, dtype):
    """Floating-point leaves of a parameter State in `dtype` (integers untouched)."""
    if dtype is None:
        return state
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype)
                        if jnp.issubdtype(np.asarray(x).dtype, jnp.floating) else x, state)


def place_weights(state, mesh: Mesh, *, dtype=None, rules: Rules = DEFAULT_RULES,
                  shard: bool = True):
    """A network's parameter State cast to `dtype` (None: as is) and put on `mesh`: sharded by
    the parameters' logical names when `shard` (FSDP over the mesh's fsdp axis), else replicated."""
    if shard:   # laid out from the stored (fp32) sizes, so a cast does not change which arrays shard
        shardings = param_shardings(state, mesh, rules)
    else:
        replicated = NamedSharding(mesh, PartitionSpec())
        shardings = jax.tree.map(lambda _: replicated, state)
    return jax.device_put(cast_floats(state, dtype), shardings)


def bytes_per_device(trees: Mapping[str, object]) -> dict[str, int]:
    """Bytes each named tree of jax.Arrays holds on its most loaded device."""
    out = {}
    for name, tree in trees.items():
        per_device: dict = {}
        for leaf in jax.tree.leaves(tree):
            for shard in getattr(leaf, "addressable_shards", ()):
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        out[name] = max(per_device.values(), default=0)
    return out
