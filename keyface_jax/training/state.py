"""The train state: trainable and frozen parameters, optimizer state, EMA, step and PRNG key,
with the shardings that lay each of them out on the mesh (FSDP from the logical axis names).

Trainable and frozen parameters are separate NNX States, so gradients and optimizer moments
exist only for what trains (the reference freezes the temporal layers: ~40 % of the UNet).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from keyface_jax.sharding import DEFAULT_RULES, param_shardings
from keyface_jax.training.trainable import is_trainable, param_name

TrainState = dict  # {"step", "rng", "params", "frozen", "opt_state", "ema"}


def trainable_filter(trainable_cfg) -> Callable:
    """An NNX filter (path, value) → bool selecting the Params that train under `config.trainable`."""
    preset = trainable_cfg.get("preset", "reference")
    freeze, unfreeze = tuple(trainable_cfg.get("freeze", ())), tuple(trainable_cfg.get("unfreeze", ()))
    return lambda path, _: is_trainable(param_name(path), preset, freeze, unfreeze)


def split_network(network, trainable_cfg):
    """(graphdef, trainable Params, frozen Params). Non-Param state is an error: KeyFace networks
    hold none, and silently dropping e.g. batch statistics would be a bug."""
    graphdef, trainable, frozen, rest = nnx.split(
        network, nnx.All(nnx.Param, trainable_filter(trainable_cfg)), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"network has non-parameter state {list(nnx.to_flat_state(rest))[:3]}")
    if not jax.tree.leaves(trainable):
        raise ValueError(f"config.trainable {dict(trainable_cfg)} leaves nothing to train")
    return graphdef, trainable, frozen


def init_train_state(trainable, frozen, tx: optax.GradientTransformation, seed: int,
                     ema: bool) -> TrainState:
    return dict(step=jnp.zeros((), jnp.int32),
                rng=jax.random.key_data(jax.random.key(seed)),
                params=trainable, frozen=frozen, opt_state=tx.init(trainable),
                ema=jax.tree.map(jnp.copy, trainable) if ema else None)


def _path_key(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _suffix_lookup(table: dict[tuple, Any], path: tuple):
    for start in range(len(path)):
        if path[start:] in table:
            return table[path[start:]]
    return None


def state_shardings(abstract_state: TrainState, abstract_trainable, abstract_frozen, mesh: Mesh,
                    min_bytes: int | None = None, rules=DEFAULT_RULES) -> TrainState:
    """NamedShardings for every leaf of a train state. Parameters follow their logical axis names;
    optimizer moments and EMA follow the parameter they mirror (matched by path suffix); scalars
    (step, counts, PRNG) are replicated. Raises (naming the parameter) if the mesh cannot shard it."""
    kwargs = {} if min_bytes is None else dict(min_bytes=min_bytes)
    table = {}
    for abstract in (abstract_trainable, abstract_frozen):
        shardings = param_shardings(abstract, mesh, rules, **kwargs)
        for path, leaf in jax.tree_util.tree_flatten_with_path(shardings)[0]:
            table[_path_key(path)] = leaf
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        if leaf is None:
            return None
        key = _path_key(path)
        top = key[0] if key else ""
        if top in ("step", "rng"):
            return replicated
        found = _suffix_lookup(table, key[1:])
        # A moment has its parameter's shape; anything else of that path (none in AdamW) replicates.
        if found is not None and len(found.spec) in (0, np.ndim(leaf)):
            return found
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
