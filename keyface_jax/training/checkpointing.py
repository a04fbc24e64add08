"""Orbax checkpoints of a training run: train state + data-iterator state, asynchronous saves,
a keep-policy, saving on SIGTERM / preemption, and restore with fall-back past a broken latest.

Layout: `workdir/checkpoints/<step>/{state, data}`; `state` is the train-state pytree (restored
onto whatever mesh the abstract target carries, so a 4-device checkpoint restores onto 2),
`data` the Grain iterator's per-process JSON state.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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
        try:
            import grain.checkpoint as grain_checkpoint
            handlers["data"] = grain_checkpoint.CheckpointHandler()
            self._grain = grain_checkpoint
        except ImportError:  # loaders without grain have no iterator state to keep
            self._grain = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every), 1),
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.every = every

    def _args(self, state, data_iterator, restore: bool):
        items = {"state": ocp.args.StandardRestore(state) if restore else ocp.args.StandardSave(state)}
        if data_iterator is not None and self._grain is not None:
            cls = self._grain.CheckpointRestore if restore else self._grain.CheckpointSave
            items["data"] = cls(data_iterator)
        return ocp.args.Composite(**items)

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        """Saves if `step` is on the interval (or `force`); returns whether a save started.
        A step already saved is not saved again."""
        if step in self.manager.all_steps():
            return False
        return bool(self.manager.save(step, args=self._args(state, data_iterator, restore=False),
                                      force=force))

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process has been told of a preemption (multi-host
        agreement through JAX's coordination service); False without jax.distributed."""
        try:
            return bool(self.manager.reached_preemption(step))
        except Exception:  # noqa: BLE001 - no coordination service (single process)
            return False

    def restore_latest(self, abstract_state, data_iterator=None):
        """(step, state) of the newest checkpoint that restores, or (None, None) when there is none.
        A checkpoint whose train state fails to restore (truncated or corrupted files) is skipped
        with a warning and the previous one is tried. The data iterator is restored from the same
        step; if its saved state does not fit (e.g. another number of processes), an iterator whose
        position is a function of the step (`seek(step)`) is repositioned instead."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            except Exception as e:  # noqa: BLE001 - any failure means: try an older one
                log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous one",
                            self.directory, step, type(e).__name__, str(e)[:300])
                continue
            if data_iterator is not None:
                self._restore_data(step, data_iterator)
            return step, restored["state"]
        return None, None

    def _restore_data(self, step: int, data_iterator) -> None:
        try:
            if self._grain is None:
                raise RuntimeError("grain is not installed")
            self.manager.restore(step, args=ocp.args.Composite(
                data=self._grain.CheckpointRestore(data_iterator)))
        except Exception as e:  # noqa: BLE001
            if not hasattr(data_iterator, "seek"):
                raise RuntimeError(f"checkpoint {self.directory}/{step}: the data iterator state cannot "
                                   f"be restored ({e})") from e
            log.warning("checkpoint %s/%d: data iterator state not restorable (%s); positioning the "
                        "iterator by step instead", self.directory, step, str(e)[:200])
            data_iterator.seek(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
