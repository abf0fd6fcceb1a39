"""Evaluation at scale: the bootstrap C-index CI and the time-dependent AUC at n = 100,000.

Targets (2-core CPU): `metrics.concordance_index_ci(..., n_bootstrap=1000)` in under a minute,
`metrics.time_dependent_auc` under 2 GB (peak of the allocations it makes, by tracemalloc, which
numpy reports to). The O(n^2) approaches they replace are given for scale: lifelines' C-index
timed on one resample and multiplied by the number of resamples, and the size of one float64
cases x controls matrix (the old AUC built several).
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import numpy as np

from moemil_jax import metrics


def cohort(n: int, seed: int = 0):
  """Overall survival in months, rounded to 0.1 (tied times, as real follow-up), about half events,
  and a risk score with real signal and tied values."""
  rng = np.random.default_rng(seed)
  risk = np.round(rng.normal(size=n), 3)
  event_time = rng.exponential(60 * np.exp(-0.7 * risk))
  censor_time = rng.uniform(12, 120, n)
  time_ = np.round(np.minimum(event_time, censor_time), 1)
  return time_, (event_time <= censor_time).astype(np.float64), risk


def _peak_mb(fn) -> tuple[Any, float, float]:
  """fn()'s result, its wall seconds and the peak MiB it allocated beyond what was live before."""
  tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  return out, seconds, (peak - base) / 2**20


def run(quick: bool = False, *, n_bootstrap: int = 1000, lifelines_resamples: int = 1) -> dict:
  """Seconds for the bootstrap C-index CI and peak MiB of the time-dependent AUC.

  Full: n = 100,000 (the targets' size); quick: n = 10,000. `lifelines_resamples` resamples are
  timed with lifelines for the old figure (0 skips it).
  """
  from lifelines.utils import concordance_index as lifelines_c

  n = 10_000 if quick else 100_000
  t, e, r = cohort(n, seed=0)
  train_t, train_e, _ = cohort(n, seed=1)
  horizon = 36.0

  start = time.perf_counter()
  c, lo, hi = metrics.concordance_index_ci(t, e, r, n_bootstrap=n_bootstrap)
  ci_s = time.perf_counter() - start

  auc, td_s, td_mb = _peak_mb(
    lambda: metrics.time_dependent_auc(train_t, train_e, t, e, r, horizon)
  )
  cases = int(((e > 0) & (t <= horizon)).sum())
  controls = int((t > horizon).sum())

  out = {
    'n': n,
    'n_bootstrap': n_bootstrap,
    'eval_cindex_ci_s': ci_s,
    'eval_tdauc_mb': td_mb,
    'eval_tdauc_s': td_s,
    'c_index': c,
    'c_index_ci': [lo, hi],
    'td_auc': auc,
    'td_auc_horizon': horizon,
    'td_auc_cases': cases,
    'td_auc_controls': controls,
    'old_tdauc_one_matrix_mb': cases * controls * 8 / 2**20,
    'targets': {'eval_cindex_ci_s': '< 60 at n = 1e5', 'eval_tdauc_mb': '< 2048 at n = 1e5'},
  }
  if lifelines_resamples > 0:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(lifelines_resamples):
      idx = rng.integers(0, n, n)
      lifelines_c(t[idx], -r[idx], e[idx])
    per = (time.perf_counter() - start) / lifelines_resamples
    out['old_cindex_ci_lifelines_est_s'] = per * n_bootstrap
    out['cindex_ci_speedup_est'] = per * n_bootstrap / ci_s
  return out


if __name__ == '__main__':
  import json
  import sys

  print(json.dumps(run(quick='--quick' in sys.argv[1:]), indent=2))
