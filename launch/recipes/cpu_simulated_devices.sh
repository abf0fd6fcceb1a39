#!/usr/bin/env bash
# Try data parallelism without accelerators: 8 virtual CPU devices (what tests/test_parallel.py uses).
#   launch/recipes/cpu_simulated_devices.sh STORE WORKDIR
set -euo pipefail
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu
python -m launch.train --config=moemil_jax/configs/test.py --store="$1" --workdir="$2" \
  --config.mesh.data=8
