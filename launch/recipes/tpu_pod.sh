#!/usr/bin/env bash
# A TPU pod slice (several hosts): the same command on every worker; jax.distributed
# finds the coordinator and process ids from the TPU metadata by itself.
#   launch/recipes/tpu_pod.sh TPU_NAME ZONE STORE WORKDIR
# STORE must be readable at the same path on every worker (a gcsfuse mount or a copy).
set -euo pipefail
TPU=$1 ZONE=$2 STORE=$3 WORKDIR=$4
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/moemil-jax && . .venv/bin/activate &&
  python -m launch.train --config=moemil_jax/configs/moemil.py --store=$STORE \
    --workdir=$WORKDIR/moemil --config.mesh.distributed=True"
