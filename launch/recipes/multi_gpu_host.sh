#!/usr/bin/env bash
# One host, N GPUs: torchrun extraction (one rank per GPU), then one JAX process that trains
# the default recipe unchanged, its ensemble members sharded over every local GPU.
#   launch/recipes/multi_gpu_host.sh MANIFEST STORE WORKDIR
set -euo pipefail
MANIFEST=$1 STORE=$2 WORKDIR=$3
NGPU=$(nvidia-smi -L | wc -l)
# Each rank takes slides/patients k % NGPU == RANK on cuda:$LOCAL_RANK; the last rank to
# finish assembles STORE.json, clinical, radiomics and deep-MRI tables.
OMP_NUM_THREADS=4 torchrun --standalone --nproc_per_node="$NGPU" -m launch.extract \
  --manifest="$MANIFEST" --store="$STORE" --device=cuda --batch_size=256 --workers=4
python -m launch.train --config=moemil_jax/configs/moemil.py --store="$STORE" \
  --workdir="$WORKDIR/moemil"
