"""Timing primitives shared by the benchmarks: medians of repeated runs, the machine, its matmul peak.

Figures are reported as ratios of things measured side by side in one process, so a
noisy shared machine shifts both sides alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of fn(), blocking on JAX results so async dispatch is counted."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def machine_description() -> dict[str, Any]:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(
        (line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu
      )
  except OSError:
    pass
  import torch

  device = jax.devices()[0]
  return {
    'cpu': cpu,
    'cpu_count': os.cpu_count(),
    'jax_backend': jax.default_backend(),
    'jax_device': getattr(device, 'device_kind', str(device)),
    'jax_devices': jax.device_count(),
    'jax': jax.__version__,
    'torch': torch.__version__,
    'torch_threads': torch.get_num_threads(),
    'python': platform.python_version(),
  }


class MatmulPeak:
  """A square matmul big enough that dispatch does not matter: the roofline for P1.

  n: the side; None picks it, from 8192 on a GPU (2048 on a CPU), doubled until one call
  takes at least `min_seconds`. `seconds()` times one call (blocking), so callers can
  alternate it with what they compare it to.
  """

  def __init__(self, *, n: int | None = None, dtype=jnp.float32, min_seconds: float = 0.05):
    key = jax.random.key(0)
    self.dtype = jnp.dtype(dtype)
    self._matmul = jax.jit(lambda x, y: x @ y)
    self.n = n or (8192 if jax.default_backend() == 'gpu' else 2048)
    while True:
      self._a = jax.random.normal(key, (self.n, self.n), self.dtype)
      self._b = jax.random.normal(jax.random.fold_in(key, 1), (self.n, self.n), self.dtype)
      first = median_seconds(lambda: self._matmul(self._a, self._b), repeats=1, warmup=1)
      if n is not None or first >= min_seconds or self.n >= 16384:
        break
      self.n *= 2

  @property
  def flops(self) -> float:
    return 2.0 * self.n**3

  def seconds(self) -> float:
    return median_seconds(lambda: self._matmul(self._a, self._b), repeats=1, warmup=0)


def matmul_peak_flops(*, n: int | None = None, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul in this process (median of `repeats` calls)."""
  peak = MatmulPeak(n=n, dtype=dtype)
  return peak.flops / statistics.median(peak.seconds() for _ in range(repeats))


def loglog_slope(sizes, seconds) -> float:
  """Empirical exponent of time against size (1 for linear, 2 for quadratic)."""
  return float(
    np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float)), 1)[0]
  )
