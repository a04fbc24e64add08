#!/usr/bin/env bash
# Train on this machine (CPU or its accelerators). Re-running the same command resumes.
#   bash launch/train_local.sh configs/keyframe.py:tiny runs/keyframe --config.data.path=demo/dataset
# Any further arguments are config overrides or trainer flags.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:?config, e.g. configs/keyframe.py:tiny}"; WORKDIR="${2:?workdir}"; shift 2
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec python -m keyface_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
