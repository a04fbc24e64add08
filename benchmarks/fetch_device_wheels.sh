#!/usr/bin/env bash
# Wheels the accelerator machine lacks (Python 3.12, its own CUDA jax): ml_collections, flax and
# optax at our pins, and PyAV for the mp4 writer, downloaded into .whl/ (git-ignored) for
# `run(carry=[".whl"])`; benchmarks/device_check.sh installs them there with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    ml_collections==1.1.0 flax==0.12.8 optax==0.2.8 av==18.1.0 -d .whl
ls -la .whl
