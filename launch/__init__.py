"""Command-line programs: thin absl mains over `moemil_jax` and `feature_store`."""

import os

# PyTorch's OpenMP threads spin while they wait for work (libgomp's default); on a CPU shared
# with other jobs a spinning thread holds a core another one needs: a ResNet50 call on one MRI
# slice took 2.9 s instead of 0.26 s (load 11 on 2 cores). Passive threads sleep instead and
# the numbers are the same. Set before any launcher imports torch; a value given is kept.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
