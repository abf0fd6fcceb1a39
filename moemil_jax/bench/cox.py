"""P6: the O(n log n) Cox partial likelihood against n, and against an O(n^2) risk-matrix loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moemil_jax import losses
from moemil_jax.bench import timing


def risk_matrix_cox_nll(log_risk, time, event):
  """The textbook O(n^2) Breslow loss (an n x n at-risk matrix), as many PyTorch repos write it."""
  at_risk = time[None, :] >= time[:, None]
  log_r = jax.nn.logsumexp(jnp.where(at_risk, log_risk[None, :], -jnp.inf), axis=1)
  return -jnp.sum(jnp.where(event > 0, log_risk - log_r, 0.0)) / jnp.maximum(jnp.sum(event), 1)


def _data(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  log_risk = rng.normal(size=n).astype(np.float32)
  time = np.round(rng.exponential(60, n), 1).astype(np.float32)  # ties, as in real follow-up
  event = (rng.random(n) < 0.4).astype(np.float32)
  return jnp.asarray(log_risk), jnp.asarray(time), jnp.asarray(event)


def run(quick: bool = False) -> dict[str, Any]:
  sizes = [1_000, 10_000, 50_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
  quad_sizes = [1_000, 3_000] if quick else [1_000, 5_000, 10_000, 20_000]
  fast = jax.jit(jax.value_and_grad(lambda r, t, e: losses.cox_nll(r, t, e, ties='breslow')))
  slow = jax.jit(jax.value_and_grad(risk_matrix_cox_nll))
  repeats = 2 if quick else 5
  rows = []
  for n in sorted(set(sizes) | set(quad_sizes)):
    r, t, e = _data(n)
    row = {'n': n}
    if n in sizes:
      row['sorted_s'] = timing.median_seconds(lambda: fast(r, t, e), repeats=repeats)
    if n in quad_sizes:
      row['risk_matrix_s'] = timing.median_seconds(lambda: slow(r, t, e), repeats=repeats)
      if 'sorted_s' not in row:
        row['sorted_s'] = timing.median_seconds(lambda: fast(r, t, e), repeats=repeats)
      row['speedup'] = row['risk_matrix_s'] / row['sorted_s']
    rows.append(row)
  big = [row for row in rows if row['n'] in sizes]
  return {
    'rows': rows,
    'slope_sorted': timing.loglog_slope([r['n'] for r in big], [r['sorted_s'] for r in big]),
    'largest_n': big[-1]['n'],
    'largest_n_seconds': big[-1]['sorted_s'],
    'speedup_at_largest_quadratic_n': rows[[r['n'] for r in rows].index(quad_sizes[-1])]['speedup'],
  }
