#!/usr/bin/env bash
# The test suite on a bare machine: sets up .venv with the test-only deps (torch CPU, diffusers), then
# runs pytest. Extra arguments go to pytest (e.g. -k parity, -m "not slow").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh" test
cd "$ROOT"
python -m pytest -q tests "$@"
