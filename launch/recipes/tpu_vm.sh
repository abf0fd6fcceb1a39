#!/usr/bin/env bash
# A single TPU VM (e.g. v5litepod-8 / v4-8): the default recipe, its members over the chips.
# Extraction runs once elsewhere (GPU host or the VM's CPUs); copy or mount the store here.
#   launch/recipes/tpu_vm.sh STORE WORKDIR
set -euo pipefail
STORE=$1 WORKDIR=$2
pip install -e '.[tpu]'
python -c "import jax; print(jax.device_count(), jax.devices())"
python -m launch.train --config=moemil_jax/configs/moemil.py --store="$STORE" \
  --workdir="$WORKDIR/moemil"
# bf16 matmuls suit the MXU; parameters stay float32.
python -m launch.sweep --config=moemil_jax/configs/moemil.py --store="$STORE" --workdir="$WORKDIR/sweep" \
  --config.split.folds=5 --seeds=0,1,2 --config.model.compute_dtype=bfloat16
