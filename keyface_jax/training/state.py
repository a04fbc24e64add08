"""The train state: trainable and frozen parameters, optimizer state, EMA, step and PRNG key,
with the shardings that lay each of them out on the mesh (FSDP from the logical axis names).

Trainable and frozen parameters are separate NNX States, so gradients and optimizer moments
exist only for what trains (the reference freezes the temporal layers: ~40 % of the UNet).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from keyface_jax.sharding import DEFAULT_RULES, param_shardings


@struct.dataclass
class TrainState:
    """Everything a run carries from step to step (one pytree: jitted, donated, checkpointed).

    step: int32 []; rng: uint32 key data of the run's PRNG key; params: trainable Params (an
    nnx.State); frozen: the other Params; opt_state: the optimizer's state over `params`; ema: an
    exponential moving average of `params`, or None when the run keeps none."""

    step: Any
    rng: Any
    params: Any
    frozen: Any
    opt_state: Any
    ema: Any = None

    def weights(self):
        """The weights to sample or export with: the EMA copy when kept, else the parameters."""
        return self.ema if self.ema is not None else self.params


def init_train_state(trainable, frozen, tx: optax.GradientTransformation, seed: int,
                     ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32),
                      rng=jax.random.key_data(jax.random.key(seed)),
                      params=trainable, frozen=frozen, opt_state=tx.init(trainable),
                      ema=jax.tree.map(jnp.copy, trainable) if ema else None)


def state_shardings(abstract_state: TrainState, tx: optax.GradientTransformation, mesh: Mesh,
                    min_bytes: int | None = None, rules=DEFAULT_RULES) -> TrainState:
    """NamedShardings for every leaf of a train state. Parameters (trainable and frozen) follow
    their logical axis names; the EMA copy and every optimizer leaf that mirrors a parameter
    (found through the optimizer's own state structure, `optax.tree_map_params`) take that
    parameter's sharding; everything else (step, PRNG key, counts) is replicated. Raises (naming
    the parameter) if the mesh cannot shard it."""
    kwargs = dict(rules=rules) if min_bytes is None else dict(rules=rules, min_bytes=min_bytes)
    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(abstract_state.params, mesh, **kwargs)
    opt_state = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_state.opt_state,
                                      params, transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, rng=replicated, params=params,
                      frozen=param_shardings(abstract_state.frozen, mesh, **kwargs),
                      opt_state=opt_state,
                      ema=None if abstract_state.ema is None else params)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
