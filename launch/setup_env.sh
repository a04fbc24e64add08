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
"$ROOT/.venv/bin/python" -m pip install -q --no-deps -e "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
