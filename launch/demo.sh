#!/usr/bin/env bash
# The main job on the embedded default, end to end (about 20 min on 2 idle CPU cores):
#   1. describe the networks (parameter counts, FLOPs; paper-size models built abstractly)
#   2. build the offline demo videos (real face photo + real speech, lip motion, laughs, sighs)
#   3. train a tiny autoencoder on their frames (no SVD VAE weights ship offline)
#   4. prepare the videos into a TFDS ArrayRecord dataset with it (latents, audio tokens, emotions)
#   5. train the tiny keyframe and interpolation models (TensorBoard logs, checkpoints)
#   6. make held-out test speech (neural TTS with pauses, a laugh and a sigh: not in training)
#   7. generate a ≥30-s video from it and the demo face (keyframes → interpolation → decode → mp4)
#   8. evaluate it (lip sync vs a 1-s-shifted control, identity drift, silence/laugh motion) and
#      write a contact sheet, the loss curves and metrics.json
# Every stage resumes when re-run (finished ones are skipped), whatever form the output path had.
# Outputs go to $KEYFACE_DEMO_DIR (default outputs/demo, relative to the repository root).
# The console shows stage lines, progress bars, results and warnings; KEYFACE_VERBOSE=1 adds the
# libraries' INFO logging.
# DEMO_STEPS: diffusion training steps per model (default 300); DEMO_AE_STEPS (default 200);
# DEMO_SECONDS: length of the held-out speech (default 32); DEMO_VIDEOS: demo videos (default 4);
# DEMO_DESCRIBE=0 skips stage 1. tests/test_demo_job.py runs a shortened version (same code path).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${DEMO_SKIP_SETUP:-}" ]; then source "$ROOT/launch/setup_env.sh"; fi  # tests: already set up
cd "$ROOT"
OUT="${KEYFACE_DEMO_DIR:-outputs/demo}"
STEPS="${DEMO_STEPS:-300}"
AE_STEPS="${DEMO_AE_STEPS:-200}"
SECONDS_OUT="${DEMO_SECONDS:-32}"
NUM_VIDEOS="${DEMO_VIDEOS:-4}"
mkdir -p "$OUT"
START=$(date +%s)
stage() { echo "== $1   [$(( $(date +%s) - START )) s]"; }

stage "1/8 models"
if [ "${DEMO_DESCRIBE:-1}" != "0" ] && [ ! -f "$OUT/describe.json" ]; then
  python -m keyface_jax.describe --json "$OUT/describe.json"
fi

stage "2/8 demo videos"
if [ ! -f "$OUT/videos/manifest.json" ]; then
  python -m data_pipelines.demo.build --output "$OUT/videos" --num_videos "$NUM_VIDEOS" --seconds 10 \
      --size 128 --seed 0
fi

stage "3/8 autoencoder"
python -m keyface_jax.train --config=configs/autoencoder.py:tiny --workdir="$OUT/runs/autoencoder" \
    --config.data.videos="$OUT/videos/videos" --config.train.steps="$AE_STEPS"

stage "4/8 dataset"
python -m data_pipelines.prepare --config configs/keyframe.py:tiny --videos "$OUT/videos/videos" \
    --emotions "$OUT/videos/emotions" --output "$OUT/dataset" --vae "$OUT/runs/autoencoder/export"

stage "5/8 training"
for stage_name in keyframe interpolation; do
  python -m keyface_jax.train --config="configs/$stage_name.py:tiny" --workdir="$OUT/runs/$stage_name" \
      --config.data.path="$OUT/dataset" --config.train.steps="$STEPS" \
      --config.train.checkpoint_every=$(( (STEPS + 2) / 3 )) --config.train.keep_checkpoints=3 \
      --config.train.log_every=10
done

stage "6/8 held-out speech"
if [ ! -f "$OUT/heldout/speech.wav" ]; then
  python -m data_pipelines.demo.heldout --output "$OUT/heldout" --seconds "$SECONDS_OUT"
fi

stage "7/8 generation"
FACE="$(ls "$OUT"/videos/videos/*.mp4 | head -1)"
if [ ! -f "$OUT/generated/heldout.mp4" ]; then
  python -m keyface_jax.generate --face "$FACE" --audio "$OUT/heldout/speech.wav" \
      --output "$OUT/generated/heldout.mp4" --emotion neutral --seed 0 \
      --keyframe "$OUT/runs/keyframe" --interpolation "$OUT/runs/interpolation" \
      --autoencoder "$OUT/runs/autoencoder/export"
fi

stage "8/8 evaluation and report"
if [ ! -f "$OUT/report/evaluation.json" ] || [ "$OUT/generated/heldout.mp4" -nt "$OUT/report/evaluation.json" ]; then
  python -m keyface_jax.evaluate --video "$OUT/generated/heldout.mp4" \
      --identity "$OUT/generated/heldout.identity.png" --manifest "$OUT/heldout/timeline.json" --output "$OUT/report/evaluation.json" \
      --plots "$OUT/report" --no_signals
fi
echo "{\"demo_seconds\": $(( $(date +%s) - START )), \"diffusion_steps\": $STEPS, \"autoencoder_steps\": $AE_STEPS}" \
    > "$OUT/report/timings.json"
python -m keyface_jax.report --video "$OUT/generated/heldout.mp4" \
    --runs "$OUT/runs/autoencoder" "$OUT/runs/keyframe" "$OUT/runs/interpolation" \
    --evaluation "$OUT/report/evaluation.json" --extra "$OUT/report/timings.json" --output "$OUT/report"

stage "done"
echo "outputs in $OUT:"
echo "  video         $OUT/generated/heldout.mp4  (from held-out speech $OUT/heldout/speech.wav)"
echo "  report        $OUT/report/metrics.json, contact_sheet.png, losses.png, heldout_eval.png"
echo "  training runs $OUT/runs/{autoencoder,keyframe,interpolation} (tensorboard --logdir $OUT/runs)"
