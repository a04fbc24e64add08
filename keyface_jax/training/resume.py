"""Starting a run or resuming it, the same for every trainer: the train state's shardings, the
run checkpoints, the newest checkpoint restored onto the current mesh, else a fresh init.

Resume order (big_vision's): the workdir's own checkpoints, else the run's initial weights
(`config.init`, loaded by the trainer's `initial_params`), else a seeded fresh init. A workdir
whose checkpoints do not fit the config, or none of whose checkpoints can be read, is an error
(training/run_checkpoints.py). A run whose newest checkpoint is at or past `config.train.steps`
is finished: `skip_finished` returns at once, before any restore or compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import jax
import optax
from jax.sharding import Mesh

from keyface_jax.paths import PathLike, as_path, canonical
from keyface_jax.training.run_checkpoints import (CHECKPOINTS, UNREADABLE, RunCheckpointer,
                                                   RunMismatch)
from keyface_jax.sharding import rules_from_config
from keyface_jax.training.state import TrainState, abstract_like, init_train_state, state_shardings

log = logging.getLogger("keyface_jax.train")


@dataclasses.dataclass
class RunStart:
    start: int                   # steps already done (0 for a fresh run)
    state: TrainState | None     # on the mesh; None when the run is already finished
    shardings: TrainState        # NamedSharding per leaf
    checkpoints: RunCheckpointer
    finished: bool = False       # the workdir's newest checkpoint reached config.train.steps


def start_or_resume(config, workdir: PathLike, abstract_trainable, abstract_frozen,
                    tx: optax.GradientTransformation, mesh: Mesh,
                    initial_params: Callable[[tuple], tuple], what: str, *,
                    skip_finished: bool = True) -> RunStart:
    """`initial_params((trainable shardings, frozen shardings))` gives the fresh run's
    (trainable, frozen) on the mesh; it is called only when the workdir has no checkpoint.
    `what` names the model in errors."""
    init_state = functools.partial(init_train_state, tx=tx, seed=config.seed,
                                   ema=config.optim.ema_decay > 0)
    abstract_state = jax.eval_shape(init_state, abstract_trainable, abstract_frozen)
    try:
        shardings = state_shardings(abstract_state, tx, mesh, rules=rules_from_config(config.mesh))
    except ValueError as e:
        raise ValueError(f"the {what} cannot shard on mesh {dict(mesh.shape)}: {e}") from None
    checkpoints = RunCheckpointer(as_path(workdir) / CHECKPOINTS,
                                  every=config.train.checkpoint_every,
                                  keep=config.train.keep_checkpoints)
    target = abstract_like(abstract_state, shardings)
    run_dir = canonical(workdir)
    steps = checkpoints.steps()
    if skip_finished and steps and steps[0] >= int(config.train.steps):
        try:
            checkpoints.check_fits(steps[0], target, run_dir)
        except RunMismatch:
            raise
        except UNREADABLE:
            pass          # restore_latest below falls back past it, or says why it cannot
        else:
            return RunStart(steps[0], None, shardings, checkpoints, finished=True)
    start, state = checkpoints.restore_latest(target, run_dir)
    if state is None:
        params = initial_params((shardings.params, shardings.frozen))
        return RunStart(0, jax.jit(init_state, out_shardings=shardings)(*params), shardings,
                        checkpoints)
    log.info("resumed from %s at step %d", checkpoints.directory, start)
    return RunStart(int(start), state, shardings, checkpoints)
