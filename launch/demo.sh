#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv, then describes and smoke-runs the models.
# Extra arguments go to `python -m keyface_jax.describe` (e.g. --variants tiny,small,full).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
python -m keyface_jax.describe "$@"
