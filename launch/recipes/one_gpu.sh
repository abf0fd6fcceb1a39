#!/usr/bin/env bash
# One GPU: extract once (PyTorch on the GPU), then train and sweep on the same GPU.
#   launch/recipes/one_gpu.sh MANIFEST STORE WORKDIR
set -euo pipefail
MANIFEST=$1 STORE=$2 WORKDIR=$3
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}  # JAX preallocates this share
python -m launch.extract --manifest="$MANIFEST" --store="$STORE" --device=cuda --batch_size=256 --workers=8
python -m launch.train --config=moemil_jax/configs/moemil.py --store="$STORE" --workdir="$WORKDIR/moemil"
python -m launch.sweep --config=moemil_jax/configs/moemil.py --store="$STORE" --workdir="$WORKDIR/sweep" \
  --config.split.folds=5 --seeds=0,1 --learning_rates=3e-4,1e-3
