"""What a command prints by default: our own progress and result lines (INFO and up), progress
bars, and warnings; the libraries' INFO chatter (Orbax's save/restore lines, Grain, absl) only
when asked for with `--verbose` or `KEYFACE_VERBOSE=1`."""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "KEYFACE_VERBOSE"
# Libraries whose INFO lines describe their own mechanics, not the job's progress.
_LIBRARIES = ("absl", "orbax", "jax", "grain", "gcsfs", "fsspec", "google", "urllib3",
              "tensorstore", "matplotlib", "PIL", "h5py")


# Library warnings that say nothing about the job: Orbax looks for per-item metadata where our
# run checkpoints keep it one level up, and restores fine without it.
_HARMLESS = ("Metadata file does not exist",)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _HARMLESS)


def verbose_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes", "on")


def setup_logging(verbose: bool = False) -> bool:
    """Configures the root logger for a command line; returns whether verbose logging is on."""
    verbose = verbose_requested(verbose)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                        else "%(levelname)s %(name)s: %(message)s")
    logging.getLogger("keyface_jax").setLevel(logging.INFO)
    logging.getLogger("data_pipelines").setLevel(logging.INFO)
    for name in _LIBRARIES:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        for old in [f for f in logger.filters if isinstance(f, _DropHarmless)]:
            logger.removeFilter(old)
        if not verbose:
            logger.addFilter(_DropHarmless())
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass
    return verbose
