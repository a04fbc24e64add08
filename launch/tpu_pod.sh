#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice. JAX finds the other hosts itself
# (TPU_WORKER_HOSTNAMES). The workdir (checkpoints, metrics, TensorBoard, previews, exports) is a
# gs:// URL that every host writes directly.
#   REPO=<git url> TPU=my-v5p-64 ZONE=us-east5-a DATA_BUCKET=my-data \
#     bash launch/tpu_pod.sh configs/keyframe.py:full gs://my-runs/kf \
#       --config.data.path=/mnt/my-data/keyface_frames/1.0.0 --config.train.batch_size=256
# Datasets: ArrayRecord (the dataset format) opens local files only, so a dataset kept in a bucket
# is read through a gcsfuse mount, made read-only on every worker at /mnt/$DATA_BUCKET (as MaxText
# mounts its datasets). gcsfuse must be installed on the TPU VM image.
# Preemption: TPU maintenance sends SIGTERM; the trainer saves and exits with status 3; re-run the
# same command to resume.
set -euo pipefail
CONFIG="${1:?config}"; WORKDIR="${2:?workdir}"; shift 2
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
: "${REPO:?set REPO to the git URL of this repository (or your fork)}"
EXTRA="$*"
MOUNT="true"
if [ -n "${DATA_BUCKET:-}" ]; then
  DIR="/mnt/$DATA_BUCKET"
  # cache every listing and stat for the run: the dataset does not change while it trains
  MOUNT="command -v gcsfuse >/dev/null || { echo 'gcsfuse is not installed on this TPU VM' >&2; exit 1; }
  sudo mkdir -p $DIR && sudo chown \$(id -u):\$(id -g) $DIR
  mountpoint -q $DIR || gcsfuse -o ro --implicit-dirs --stat-cache-max-size-mb=-1 \
      --type-cache-max-size-mb=-1 --metadata-cache-ttl-secs=-1 $DATA_BUCKET $DIR"
fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  $MOUNT
  [ -d keyface-jax ] || git clone $REPO keyface-jax
  cd keyface-jax && git pull --ff-only
  source launch/setup_env.sh && pip install -q 'jax[tpu]==0.10.2'
  python -m keyface_jax.train --config=$CONFIG --workdir=$WORKDIR $EXTRA"
