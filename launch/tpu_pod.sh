#!/usr/bin/env bash
# Train on every worker of a Cloud TPU pod slice. JAX finds the other hosts itself
# (TPU_WORKER_HOSTNAMES); the workdir and dataset must be on storage all hosts share (GCS or NFS).
#   REPO=<git url> TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh configs/keyframe.py:full gs://bucket/runs/kf \
#       --config.data.path=gs://bucket/data/keyface --config.train.batch_size=256
# Preemption: TPU maintenance sends SIGTERM; the trainer saves and exits; re-run to resume.
set -euo pipefail
CONFIG="${1:?config}"; WORKDIR="${2:?workdir}"; shift 2
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
: "${REPO:?set REPO to the git URL of this repository (or your fork)}"
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d keyface-jax ] || git clone $REPO keyface-jax
  cd keyface-jax && git pull --ff-only
  source launch/setup_env.sh && pip install -q 'jax[tpu]==0.10.2'
  python -m keyface_jax.train --config=$CONFIG --workdir=$WORKDIR $EXTRA"
