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
# tcmalloc for XLA:CPU (keyface_jax/cpu_allocator.py: glibc re-faults XLA's per-call temporary buffer,
# ~25 % of a CPU train step). Installed best-effort where apt-get runs as root; KEYFACE_TCMALLOC=0 skips.
if [ "${KEYFACE_TCMALLOC:-1}" != "0" ]; then
  TCMALLOC_LIB="$(python -c 'from keyface_jax.cpu_allocator import find_tcmalloc; print(find_tcmalloc() or "")')"
  if [ -z "$TCMALLOC_LIB" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    { timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq libtcmalloc-minimal4; } \
      >/dev/null 2>&1 || echo "setup_env: could not install tcmalloc (CPU steps ~25 % slower)" >&2
    TCMALLOC_LIB="$(python -c 'from keyface_jax.cpu_allocator import find_tcmalloc; print(find_tcmalloc() or "")')"
  fi
  case ":${LD_PRELOAD:-}:" in
    *tcmalloc*) ;;
    *) if [ -n "$TCMALLOC_LIB" ]; then export LD_PRELOAD="$TCMALLOC_LIB${LD_PRELOAD:+:$LD_PRELOAD}"; fi ;;
  esac
fi
