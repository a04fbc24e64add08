"""What a command prints: our INFO lines and real warnings, not the libraries' chatter."""

import logging

from absl import logging as absl_logging

from keyface_jax import console


def _emit():
    logging.getLogger("keyface_jax.demo").info("stage line")
    logging.getLogger("orbax").info("orbax mechanics")
    absl_logging.warning("Metadata file does not exist: /run/checkpoints/3/state/_CHECKPOINT_METADATA")
    absl_logging.warning("a warning that means something")


def test_quiet_by_default_and_everything_when_verbose(capsys, monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    try:
        console.setup_logging()
        _emit()
        quiet = capsys.readouterr().err
        assert "stage line" in quiet and "a warning that means something" in quiet
        assert "orbax mechanics" not in quiet and "Metadata file" not in quiet
        monkeypatch.setenv(console.VERBOSE_ENV, "1")
        console.setup_logging()
        _emit()
        loud = capsys.readouterr().err
        assert "orbax mechanics" in loud and "Metadata file" in loud
    finally:
        console.setup_logging()
