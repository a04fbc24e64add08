"""Run checkpoints (Orbax) of a training run: the train state, asynchronous saves, a keep-policy,
saving on SIGTERM / preemption, and restores that fail loud and lose nothing.

Layout: `WORKDIR/checkpoints/<step>/state`, the train-state pytree (restored onto whatever mesh
the abstract target carries, so a 4-device checkpoint restores onto 2). The data position is the
step itself (batch j of a run is a function of j), so no iterator state is stored. WORKDIR may be
a local path (relative or absolute) or a gs:// URL.

Restoring, newest first:
- a checkpoint whose tree, shapes or dtypes differ from the current config's train state (EMA
  toggled, another trainable preset, parameter dtype, model size) is an error, `RunMismatch`,
  naming the first differing leaves and the ways forward; nothing in the workdir is touched (no
  new checkpoint is written, so the keep policy deletes none of the old run's);
- a checkpoint that fits but cannot be read (truncated or unreadable files) is skipped with a
  warning and the previous one is tried;
- a workdir that holds checkpoints of which none can be read is an error: never a silent
  restart from step 0.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from keyface_jax.conversion.io import CheckpointError
from keyface_jax.paths import PathLike, as_path

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"   # WORKDIR/checkpoints/<step>/state
STATE = "state"
# What reading an unreadable or truncated checkpoint raises (JSON metadata: ValueError; array
# data through tensorstore: ValueError with DATA_LOSS / OUT_OF_RANGE; a vanished file: OSError).
UNREADABLE = (ValueError, OSError)


class PreemptionFlag:
    """Set by SIGTERM (what TPU maintenance, SLURM `--signal` and Kubernetes send before a kill)."""

    def __init__(self, install: bool = True):
        self._event = threading.Event()
        if install and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def is_set(self) -> bool:
        return self._event.is_set()


class RunMismatch(CheckpointError):
    """A checkpoint written under another configuration than the current one."""


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))


def leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """'params/audio_proj/kernel/value' → (shape, dtype name) for every array leaf of a train
    state, of its abstract form or of a checkpoint's metadata (the same paths for all three)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out["/".join(_key(k) for k in path)] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
    return out


def differences(saved: Mapping, current: Mapping, limit: int = 5) -> list[str]:
    """The first differing leaves of two `leaf_specs`, one line each ([] when they fit)."""
    lines = []
    only_saved = sorted(set(saved) - set(current))
    only_current = sorted(set(current) - set(saved))
    changed = [k for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
    fmt = lambda spec: f"{spec[1]}{tuple(spec[0])}"
    if only_current:
        lines.append(f"only in this config: {', '.join(only_current[:limit])}"
                     + (f" (+{len(only_current) - limit} more)" if len(only_current) > limit else ""))
    if only_saved:
        lines.append(f"only in the checkpoint: {', '.join(only_saved[:limit])}"
                     + (f" (+{len(only_saved) - limit} more)" if len(only_saved) > limit else ""))
    for key in changed[:limit]:
        lines.append(f"{key}: checkpoint {fmt(saved[key])}, this config {fmt(current[key])}")
    if len(changed) > limit:
        lines.append(f"(+{len(changed) - limit} more leaves of other shape or dtype)")
    return lines


class RunCheckpointer:
    def __init__(self, directory: PathLike, *, every: int, keep: int, async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every), 1),
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers={STATE: ocp.StandardCheckpointHandler()})
        self.every = every

    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

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

    def check_fits(self, step: int, abstract_state, run_dir: str) -> None:
        """Raises RunMismatch unless checkpoint `step` has the tree, shapes and dtypes of
        `abstract_state`; UNREADABLE errors when its metadata cannot be read."""
        saved = leaf_specs(self.manager.item_metadata(step)[STATE])
        problems = differences(saved, leaf_specs(abstract_state))
        if problems:
            raise RunMismatch(mismatch_message(self.directory / str(step), problems, run_dir))

    def restore_latest(self, abstract_state, run_dir: str):
        """(step, state) of the newest checkpoint, (None, None) when there is none. See the
        module docstring for what a checkpoint that does not fit or cannot be read does."""
        steps, unreadable = self.steps(), []
        for step in steps:
            try:
                self.check_fits(step, abstract_state, run_dir)
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
            except RunMismatch:
                raise
            except UNREADABLE as e:
                reason = f"{type(e).__name__}: {str(e)[:300]}"
                unreadable.append(f"step {step}: {reason}")
                log.warning("checkpoint %s/%d cannot be restored (its files are truncated or "
                            "unreadable: %s); trying the previous one", self.directory, step, reason)
                continue
            return step, restored[STATE]
        if steps:
            raise CheckpointError(
                f"{self.directory} holds checkpoints {sorted(steps)} but none of them can be read "
                "(" + "; ".join(unreadable) + "). A workdir with checkpoints is never restarted "
                "from step 0: move the checkpoints away, or use a new --workdir.")
        return None, None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def mismatch_message(checkpoint: epath.Path, problems: list[str], run_dir: str) -> str:
    return (f"{checkpoint} was written under another configuration: its train state does not "
            "fit this config's (toggled EMA, another trainable preset, parameter dtype or model "
            "size?):\n  " + "\n  ".join(problems) + "\nNothing was changed. Ways forward: train "
            "with the old run's config; or use a new --workdir; or start a new run from this "
            f"run's parameters: --workdir=NEW --config.init.source=run "
            f"--config.init.path={run_dir}")


def run_steps(run_dir: PathLike) -> list[int]:
    """The steps of a run's checkpoints, oldest first ([] when it has none)."""
    folder = as_path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


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


def _restore_as_saved(folder: epath.Path) -> dict:
    """A `state` item restored onto this process's first device, whatever mesh wrote it."""
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    meta = checkpointer.metadata(folder)
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return checkpointer.restore(folder, target)


def read_run_params(run_dir: PathLike, step: int | None = None,
                    use_ema: bool = True) -> tuple[dict, int]:
    """(nested parameter dict on the host, step) of a run's checkpoint: the trainable parameters
    (EMA when kept and `use_ema`) merged with the frozen ones, restored as saved (no model
    needed). The newest checkpoint unless `step` is given; an unreadable one is skipped for the
    previous one with a warning, and the reasons are in the error when none can be read."""
    folder = as_path(run_dir) / CHECKPOINTS
    steps = sorted(run_steps(run_dir), reverse=True)
    if not steps:
        raise CheckpointError(f"{run_dir}: not a training run (no checkpoints in {folder})")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"{run_dir}: no checkpoint at step {step} (have {sorted(steps)})")
        steps = [step]
    reasons = []
    for candidate in steps:
        try:
            state = _restore_as_saved(folder / str(candidate) / STATE)
        except UNREADABLE as e:
            reasons.append(f"step {candidate}: {type(e).__name__}: {str(e)[:300]}")
            log.warning("%s step %d cannot be read (%s); trying the previous one", run_dir,
                        candidate, reasons[-1])
            continue
        trainable = state["ema"] if use_ema and state.get("ema") else state["params"]
        merged = _merge_trees(trainable, state.get("frozen") or {})
        return jax.tree.map(np.asarray, _unwrap_values(merged)), int(candidate)
    raise CheckpointError(f"{run_dir}: no checkpoint can be read: " + "; ".join(reasons))
