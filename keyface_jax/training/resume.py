"""Starting a run or resuming it, the same for every trainer: the train state's shardings, the
run checkpoints, the newest checkpoint restored onto the current mesh, else a fresh init.

Resume order (big_vision's): the workdir's own checkpoints, else the run's initial weights
(`config.init`, loaded by the trainer's `initial_params`), else a seeded fresh init.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Callable

import jax
import optax
from jax.sharding import Mesh

from keyface_jax.training.run_checkpoints import CHECKPOINTS, RunCheckpointer
from keyface_jax.training.state import TrainState, abstract_like, init_train_state, state_shardings

log = logging.getLogger("keyface_jax.train")


@dataclasses.dataclass
class RunStart:
    start: int                   # steps already done (0 for a fresh run)
    state: TrainState            # on the mesh
    shardings: TrainState        # NamedSharding per leaf
    checkpoints: RunCheckpointer


def start_or_resume(config, workdir: str, abstract_trainable, abstract_frozen,
                    tx: optax.GradientTransformation, mesh: Mesh,
                    initial_params: Callable[[tuple], tuple], what: str) -> RunStart:
    """`initial_params((trainable shardings, frozen shardings))` gives the fresh run's
    (trainable, frozen) on the mesh; it is called only when no checkpoint restores. `what` names
    the model in errors."""
    init_state = functools.partial(init_train_state, tx=tx, seed=config.seed,
                                   ema=config.optim.ema_decay > 0)
    abstract_state = jax.eval_shape(init_state, abstract_trainable, abstract_frozen)
    try:
        shardings = state_shardings(abstract_state, tx, mesh)
    except ValueError as e:
        raise ValueError(f"the {what} cannot shard on mesh {dict(mesh.shape)}: {e}") from None
    checkpoints = RunCheckpointer(os.path.join(workdir, CHECKPOINTS),
                                  every=config.train.checkpoint_every,
                                  keep=config.train.keep_checkpoints)
    start, state = checkpoints.restore_latest(abstract_like(abstract_state, shardings))
    if state is None:
        params = initial_params((shardings.params, shardings.frozen))
        return RunStart(0, jax.jit(init_state, out_shardings=shardings)(*params), shardings,
                        checkpoints)
    log.info("resumed from %s at step %d", checkpoints.directory, start)
    return RunStart(int(start), state, shardings, checkpoints)
