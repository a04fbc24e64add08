"""Run checkpoints (Orbax) of a training run: the train state, asynchronous saves, a keep-policy,
saving on SIGTERM / preemption, and restore with fall-back past a broken latest.

Layout: `workdir/checkpoints/<step>/state`, the train-state pytree (restored onto whatever mesh
the abstract target carries, so a 4-device checkpoint restores onto 2). The data position is the
step itself (batch j of a run is a function of j), so no iterator state is stored.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from keyface_jax.conversion.io import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"   # WORKDIR/checkpoints/<step>/state


class PreemptionFlag:
    """Set by SIGTERM (what TPU maintenance, SLURM `--signal` and Kubernetes send before a kill)."""

    def __init__(self, install: bool = True):
        self._event = threading.Event()
        if install and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def is_set(self) -> bool:
        return self._event.is_set()


class RunCheckpointer:
    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        handlers = {"state": ocp.StandardCheckpointHandler()}
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every), 1),
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.every = every

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`); returns whether a save started.
        A step already saved is not saved again."""
        if step in self.manager.all_steps():
            return False
        return bool(self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state)), force=force))

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process has been told of a preemption (multi-host
        agreement through JAX's coordination service); False without jax.distributed."""
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 - no coordination service (single process)
            return False

    def restore_latest(self, abstract_state):
        """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.
        A checkpoint whose train state fails to restore (truncated or corrupted files) is skipped
        with a warning and the previous one is tried."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            except Exception as e:  # noqa: BLE001 - any failure means: try an older one
                log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                            self.directory, step, type(e).__name__, str(e)[:300])
                continue
            return step, restored["state"]
        return None, None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def run_steps(run_dir: str) -> list[int]:
    """The steps of a run's checkpoints, oldest first ([] when it has none)."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def _merge_trees(*trees: Mapping) -> dict:
    """Deep union of nested dicts (a run's trainable and frozen parameters)."""
    out: dict = {}
    for tree in trees:
        for key, value in (tree or {}).items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = _merge_trees(out[key], value)
            else:
                out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def _unwrap_values(tree):
    """Checkpoints store NNX variables as {"value": array}; the networks' pure dicts do not."""
    if isinstance(tree, Mapping):
        if set(tree) == {"value"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree


def read_run_params(run_dir: str, step: int | None = None, use_ema: bool = True) -> tuple[dict, int]:
    """(nested parameter dict on the host, step) of a run's checkpoint: the trainable parameters
    (EMA when kept and `use_ema`) merged with the frozen ones, restored as saved (no target
    model needed). The newest checkpoint that restores unless `step` is given."""
    folder = os.path.join(os.path.abspath(run_dir), CHECKPOINTS)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{run_dir}: not a training run (no {CHECKPOINTS}/ folder)")
    manager = ocp.CheckpointManager(folder, item_handlers={"state": ocp.StandardCheckpointHandler()})
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{run_dir}: no checkpoint at step {step} (have {sorted(steps)})")
        steps = [step]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    for candidate in steps:
        try:
            meta = manager.item_metadata(candidate)["state"]
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                  meta)
            state = manager.restore(candidate, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        except Exception as e:  # noqa: BLE001 - a broken checkpoint: fall back to the previous
            log.warning("%s step %d does not restore (%s); trying the previous one", folder,
                        candidate, str(e)[:200])
            continue
        trainable = state["ema"] if use_ema and state.get("ema") else state["params"]
        params = jax.tree.map(np.asarray, _unwrap_values(_merge_trees(trainable,
                                                                      state.get("frozen") or {})))
        return params, int(candidate)
    raise CheckpointError(f"{run_dir}: no checkpoint restores (tried steps {steps})")
