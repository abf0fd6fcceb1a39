#!/usr/bin/env bash
# Try the device mesh without accelerators (what tests/test_parallel.py does): the default
# recipe's ensemble, its members sharded over the devices.
#   launch/recipes/cpu_simulated_devices.sh STORE WORKDIR          one process, 8 virtual CPU devices
#   launch/recipes/cpu_simulated_devices.sh STORE WORKDIR hosts    two processes of 4 devices over
#                                                                  localhost, as two hosts would run
set -euo pipefail
export JAX_PLATFORMS=cpu
ARGS=(--config=moemil_jax/configs/test.py --store="$1" --workdir="$2" --ensemble=5)
if [[ "${3:-}" != hosts ]]; then
  XLA_FLAGS="--xla_force_host_platform_device_count=8" python -m launch.train "${ARGS[@]}"
  exit
fi
export XLA_FLAGS="--xla_force_host_platform_device_count=4"
pids=()
for id in 0 1; do
  python -m launch.train "${ARGS[@]}" --config.mesh.distributed=True \
    --config.mesh.coordinator=localhost:23456 --config.mesh.num_processes=2 \
    --config.mesh.process_id=$id &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
