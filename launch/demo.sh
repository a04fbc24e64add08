#!/usr/bin/env bash
# The main job on the embedded default, end to end so far (about 10 min on 2 CPU cores):
#   1. describe the networks (parameter counts, FLOPs; paper-size models built abstractly)
#   2. build the offline demo videos (real face photo + real speech, lip motion, laughs, sighs)
#   3. prepare them into a TFDS ArrayRecord dataset (VAE latents, audio tokens, valence/arousal)
#   4. train the tiny keyframe and interpolation models on it (TensorBoard logs, checkpoints)
# Every stage resumes when re-run. Outputs go to $KEYFACE_DEMO_DIR (default outputs/demo).
# DEMO_STEPS sets the training steps per model (default 60).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup_env.sh"
cd "$ROOT"
OUT="${KEYFACE_DEMO_DIR:-outputs/demo}"
STEPS="${DEMO_STEPS:-60}"
mkdir -p "$OUT"

echo "== 1/4 models"
python -m keyface_jax.describe --json "$OUT/describe.json"

echo "== 2/4 demo videos"
if [ ! -f "$OUT/videos/manifest.json" ]; then
  python -m data_pipelines.demo.build --output "$OUT/videos" --num_videos 4 --seconds 10 \
      --size 128 --seed 0
fi

echo "== 3/4 dataset"
# No SVD VAE weights ship offline: the tiny VAE here has seeded random weights.
python -m data_pipelines.prepare --config configs/keyframe.py:tiny --videos "$OUT/videos/videos" \
    --emotions "$OUT/videos/emotions" --output "$OUT/dataset" --vae random

echo "== 4/4 training"
for stage in keyframe interpolation; do
  python -m keyface_jax.train --config="configs/$stage.py:tiny" --workdir="$OUT/runs/$stage" \
      --config.data.path="$OUT/dataset" --config.train.steps="$STEPS" \
      --config.train.checkpoint_every=20 --config.train.log_every=10
done

echo "outputs in $OUT: describe.json, videos/, dataset/, runs/<stage>/{tensorboard,metrics.jsonl,checkpoints}"
