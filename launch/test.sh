#!/usr/bin/env bash
# The test suite on a bare machine: sets up .venv with the test-only deps (torch CPU, diffusers), then
# runs pytest. Extra arguments go to pytest (e.g. -k parity, --durations=30).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh" test
cd "$ROOT"
# One pytest worker per core (pytest-xdist), whole files per worker so module fixtures run once:
# much of the suite is single-threaded XLA compilation. PYTEST_WORKERS=0 runs in one process.
python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist loadfile tests "$@"
