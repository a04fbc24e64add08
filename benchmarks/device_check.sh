#!/usr/bin/env bash
# The prepared accelerator check (issue 13): one command, at most ~8 minutes on one H100/H200.
#   bash benchmarks/device_check.sh            # on the lent machine (its own jax/flax/optax/orbax)
#   SMOKE=1 bash benchmarks/device_check.sh    # on CPU with tiny configs (a few minutes)
# Runs with the machine's preinstalled packages; only small pure-Python wheels travel in .whl/
# (ml_collections, flax and optax at our pins, PyAV for the mp4 writer; fetched by
# benchmarks/fetch_device_wheels.sh). Never installs
# requirements.txt there (it would replace the CUDA jax). Each part writes its JSON as it goes
# (benchmarks/device_check.py), so a part cut off by its time limit keeps what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/device_check}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ -z "${SMOKE:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# A rerun on the still-warm machine reuses every compiled program.
export JAX_COMPILATION_CACHE_DIR=/tmp/keyface_jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
part() {  # part NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s)   [$SECONDS s]"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" benchmarks/device_check.py "$name" --out "$OUT_DIR" "$@"
  echo "== $name exit $?   [$SECONDS s]"
}
audio_part() {  # audio_part SECONDS ARGS...: batched JAX WavLM / wav2vec2 / BEATs throughput
  local limit=$1; shift
  echo "== audio_encoders (limit ${limit} s)   [$SECONDS s]"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" benchmarks/audio_encoder_benchmark.py \
      --device-mode --output "$OUT_DIR/audio_encoders.json" "$@"
  echo "== audio_encoders exit $?   [$SECONDS s]"
}
if [ -n "${SMOKE:-}" ]; then
  part env 60
  part train 900 --variant tiny --variants xla:block,chunked:none --steps 2 --warmup 1 --budget 600 \
      --batch_search --memory_limit 4e9
  part generate 900 --variant tiny --batch 2 --lengths 1.5,2 --repeats 1
  audio_part 600 --smoke
else
  part env 40
  part train "${TRAIN_LIMIT:-270}" --budget "${TRAIN_BUDGET:-170}"
  part generate "${GENERATE_LIMIT:-130}"
  audio_part "${AUDIO_LIMIT:-60}"
fi
ls -la "$OUT_DIR"
