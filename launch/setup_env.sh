#!/usr/bin/env bash
# Creates (once) and fills the project virtualenv at .venv; safe to re-run.
# Usage: source launch/setup_env.sh [test]   ("test" adds torch CPU + diffusers for parity tests)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip
fi
REQS=(-r "$ROOT/requirements.txt")
if [ "${1:-}" = "test" ]; then REQS+=(-r "$ROOT/requirements-test.txt"); fi
"$ROOT/.venv/bin/python" -m pip install -q "${REQS[@]}"
# Real recorded speech for the demo dataset: pyannote.audio's wheel ships a 30 s sample.wav; only
# that file is used, so its (heavy) dependencies are not installed.
"$ROOT/.venv/bin/python" -m pip install -q --no-deps pyannote.audio==4.0.7
"$ROOT/.venv/bin/python" -m pip install -q --no-deps -e "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
