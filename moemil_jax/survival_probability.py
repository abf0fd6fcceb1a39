"""Overall-survival probabilities from log relative hazards: a Breslow baseline, and its checks.

A Cox-type model gives each patient a log relative hazard `lp`; the probability of being
alive at month t is S(t | lp) = exp(-H0(t) exp(lp)), with H0 the baseline cumulative hazard.
H0 is estimated by Breslow's estimator on the development patients' log-risks: the
out-of-fold ones for an ensemble (each patient scored by the members that did not train on
it, so H0 is not fitted to over-confident training risks), the training ones for a single
model. The bundle keeps H0 (its event times and values), the development cohort's
Kaplan-Meier curve (the "population" curve of the patient card) and the last follow-up time
it saw: probabilities beyond that time are not estimated (NaN).

Evaluation (per split): calibration at each horizon (mean predicted probability against the
Kaplan-Meier estimate in risk quintiles), the calibration slope (the Cox coefficient of the
log-risk in that split: 1 is ideal, below 1 too extreme), calibration in the large (observed
minus mean predicted at the horizon), and scikit-survival's time-dependent Brier score at the
horizons and integrated Brier score, beside the Kaplan-Meier null model (the development
cohort's KM curve given to everyone). Time unit: the store's os_months.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import pandas as pd

HORIZONS_MONTHS = (12.0, 36.0, 60.0)
MIN_EVENTS = 5  # fewer development events: no baseline hazard (no survival probabilities)


@dataclasses.dataclass
class Baseline:
  """Breslow's baseline cumulative hazard, a step function of months, and the KM curve of
  the patients it was fitted on."""

  times: np.ndarray  # (J,) distinct event times, ascending
  cumhaz: np.ndarray  # (J,) H0 just after each time
  max_time: float  # the last follow-up (event or censoring) of the fitting patients
  km_times: np.ndarray  # (J',) the development Kaplan-Meier curve's times
  km_survival: np.ndarray  # (J',) and its values
  source: str = ''  # 'out_of_fold' or 'training'
  n: int = 0
  events: int = 0

  def cumulative_hazard(self, t: np.ndarray | float) -> np.ndarray:
    """H0 at times t (NaN beyond the last follow-up)."""
    t = np.asarray(t, np.float64)
    idx = np.searchsorted(self.times, t, side='right')
    h = np.concatenate([[0.0], self.cumhaz])[idx]
    return np.where(t > self.max_time, np.nan, h)

  def survival(self, log_risk: np.ndarray, t: Sequence[float] | np.ndarray) -> np.ndarray:
    """(..., T) S(t | lp) for log-risks of any shape."""
    h0 = self.cumulative_hazard(np.asarray(t, np.float64))
    return np.exp(-np.exp(np.asarray(log_risk, np.float64))[..., None] * h0)

  def population(self, t: Sequence[float] | np.ndarray) -> np.ndarray:
    """The development cohort's Kaplan-Meier survival at times t (NaN beyond follow-up)."""
    t = np.asarray(t, np.float64)
    idx = np.searchsorted(self.km_times, t, side='right')
    s = np.concatenate([[1.0], self.km_survival])[idx]
    return np.where(t > self.max_time, np.nan, s)

  def to_json(self) -> dict[str, Any]:
    return {
      'times': [float(x) for x in self.times],
      'cumhaz': [float(x) for x in self.cumhaz],
      'max_time': float(self.max_time),
      'km_times': [float(x) for x in self.km_times],
      'km_survival': [float(x) for x in self.km_survival],
      'source': self.source,
      'n': int(self.n),
      'events': int(self.events),
    }

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> Baseline:
    return cls(
      times=np.asarray(d['times'], np.float64),
      cumhaz=np.asarray(d['cumhaz'], np.float64),
      max_time=float(d['max_time']),
      km_times=np.asarray(d['km_times'], np.float64),
      km_survival=np.asarray(d['km_survival'], np.float64),
      source=d.get('source', ''),
      n=int(d.get('n', 0)),
      events=int(d.get('events', 0)),
    )


def breslow(time, event, log_risk) -> tuple[np.ndarray, np.ndarray]:
  """Breslow's estimator: (distinct event times, H0 after each), with
  H0(t) = sum over event times t_j <= t of d_j / sum_{i: T_i >= t_j} exp(lp_i)."""
  time, event = np.asarray(time, np.float64), np.asarray(event, np.float64)
  w = np.exp(np.asarray(log_risk, np.float64))
  order = np.argsort(time, kind='stable')
  time, event, w = time[order], event[order], w[order]
  at_risk = np.cumsum(w[::-1])[::-1]  # sum over T_i >= T_(k), ascending order
  distinct, first = np.unique(time, return_index=True)
  deaths = np.add.reduceat(event, first)
  keep = deaths > 0
  increments = deaths[keep] / at_risk[first][keep]
  return distinct[keep], np.cumsum(increments)


def kaplan_meier(time, event) -> tuple[np.ndarray, np.ndarray]:
  """(distinct event times, KM survival after each)."""
  time, event = np.asarray(time, np.float64), np.asarray(event, np.float64)
  order = np.argsort(time, kind='stable')
  time, event = time[order], event[order]
  distinct, first, counts = np.unique(time, return_index=True, return_counts=True)
  deaths = np.add.reduceat(event, first)
  at_risk = len(time) - first
  keep = deaths > 0
  return distinct[keep], np.cumprod(1.0 - deaths / at_risk)[keep]


def fit(time, event, log_risk, source: str = '') -> Baseline:
  """The baseline of patients with follow-up (time, event) and log-risks."""
  time, event = np.asarray(time, np.float64), np.asarray(event, np.float64)
  log_risk = np.asarray(log_risk, np.float64)
  ok = np.isfinite(time) & np.isfinite(event) & np.isfinite(log_risk)
  time, event, log_risk = time[ok], event[ok], log_risk[ok]
  if event.sum() < MIN_EVENTS:
    raise ValueError(
      f'{int(event.sum())} deaths among the {len(time)} development patients with a log-risk: '
      f'at least {MIN_EVENTS} are needed for a baseline hazard'
    )
  times, cumhaz = breslow(time, event, log_risk)
  km_t, km_s = kaplan_meier(time, event)
  return Baseline(times, cumhaz, float(time.max()), km_t, km_s, source, len(time), int(event.sum()))


def development(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, str]:
  """(development rows, their log-risks, the source): out-of-fold log-risks when the run has
  them (ensembles), else the training split's log-risks."""
  known = frame['os_months'].notna() & frame['os_event'].notna()
  if 'oof_log_risk' in frame and frame['oof_log_risk'].notna().any():
    part = frame[known & frame['oof_log_risk'].notna()]
    return part, part['oof_log_risk'].to_numpy(np.float64), 'out_of_fold'
  part = frame[known & (frame['split'] == 'train')]
  return part, part['log_risk'].to_numpy(np.float64), 'training'


def fit_frame(frame: pd.DataFrame) -> Baseline:
  """The baseline of a predictions frame (`development`)."""
  part, lp, source = development(frame)
  return fit(part['os_months'], part['os_event'], lp, source)


# --------------------------------------------------------------------------- evaluation


def quantile_groups(values: np.ndarray, groups: int) -> np.ndarray:
  """Group index 0..groups-1 by rank (equal-sized groups, ties split by order)."""
  ranks = np.argsort(np.argsort(values, kind='stable'), kind='stable')
  return np.minimum(ranks * groups // max(len(values), 1), groups - 1)


def km_at(time, event, t: float) -> tuple[float, float, float]:
  """The Kaplan-Meier estimate at t with its 95% CI (lifelines, exponential Greenwood);
  NaN when t is beyond the last follow-up."""
  from lifelines import KaplanMeierFitter

  time, event = np.asarray(time, np.float64), np.asarray(event, np.float64)
  if len(time) == 0 or t > time.max():
    return float('nan'), float('nan'), float('nan')
  kmf = KaplanMeierFitter().fit(time, event)
  s = float(kmf.survival_function_at_times([t]).iloc[0])
  ci = kmf.confidence_interval_survival_function_
  row = ci[ci.index <= t].iloc[-1] if (ci.index <= t).any() else ci.iloc[0]
  return s, float(row.iloc[0]), float(row.iloc[1])


def horizon_calibration(time, event, predicted: np.ndarray, horizon: float, groups: int = 5):
  """Per risk group (quantiles of the predicted probability at `horizon`): n, mean predicted
  and Kaplan-Meier observed survival at the horizon with its 95% CI."""
  predicted = np.asarray(predicted, np.float64)
  g = quantile_groups(-predicted, min(groups, len(predicted)))  # group 0: lowest survival
  rows = []
  for k in range(int(g.max()) + 1 if len(g) else 0):
    m = g == k
    obs, lo, hi = km_at(np.asarray(time)[m], np.asarray(event)[m], horizon)
    rows.append(
      {
        'group': k + 1,
        'n': int(m.sum()),
        'predicted': float(predicted[m].mean()),
        'observed': obs,
        'observed_lo': lo,
        'observed_hi': hi,
      }
    )
  return pd.DataFrame(rows)


def calibration_slope(time, event, log_risk) -> float:
  """The coefficient of the log-risk in a Cox model of these patients (Royston & Altman):
  1 when the predicted hazard ratios hold, below 1 when they are too extreme. The same as
  the slope of cloglog(1 - S(t)) at any horizon t, since that is log H0(t) + lp."""
  from lifelines import CoxPHFitter

  df = pd.DataFrame({'t': time, 'e': event, 'lp': log_risk})
  cph = CoxPHFitter().fit(df, 't', 'e')
  return float(cph.params_['lp'])


def brier_scores(
  time, event, predicted_fn, null_fn, horizons: Sequence[float], n_grid: int = 50
) -> dict[str, Any]:
  """scikit-survival's time-dependent Brier score at the horizons and integrated Brier score
  (censoring weights from these patients), for the model and the KM null model.
  predicted_fn(times) / null_fn(times): (n, T) survival probabilities."""
  from sksurv.metrics import brier_score, integrated_brier_score
  from sksurv.util import Surv

  time, event = np.asarray(time, np.float64), np.asarray(event, bool)
  y = Surv.from_arrays(event, time)
  last = float(time[event].max()) if event.any() else float(time.max())
  out: dict[str, Any] = {}
  inside = [h for h in horizons if time.min() <= h < time.max()]
  if inside:
    _, model = brier_score(y, y, predicted_fn(np.asarray(inside)), inside)
    _, null = brier_score(y, y, null_fn(np.asarray(inside)), inside)
    for h, a, b in zip(inside, model, null):
      out[f'brier_{h:g}'], out[f'brier_null_{h:g}'] = float(a), float(b)
  upper = min(max(horizons), np.quantile(time, 0.9), last)
  lower = float(np.quantile(time, 0.05))
  if upper > lower:
    grid = np.linspace(lower, upper, n_grid)
    pm, pn = predicted_fn(grid), null_fn(grid)
    if np.isfinite(pm).all() and np.isfinite(pn).all():
      out['ibs'] = float(integrated_brier_score(y, y, pm, grid))
      out['ibs_null'] = float(integrated_brier_score(y, y, pn, grid))
      out['ibs_range'] = [float(lower), float(upper)]
  return out


def evaluate(
  frame: pd.DataFrame, horizons: Sequence[float] = HORIZONS_MONTHS, groups: int = 5
) -> dict[str, Any]:
  """Per split: calibration at each horizon, calibration slope, Brier and integrated Brier
  against the KM null model. The development split is scored out of fold when the run has
  out-of-fold log-risks (an ensemble), with the baseline fitted on them; a split's rows of
  `calibration` are the risk groups of `horizon_calibration`."""
  try:
    base = fit_frame(frame)
  except ValueError as e:
    return {'undefined': str(e)}
  out: dict[str, Any] = {'baseline_source': base.source, 'horizons_months': list(horizons)}
  known = frame['os_months'].notna() & frame['os_event'].notna()
  for split in ('train', 'val', 'test'):
    part = frame[known & (frame['split'] == split)]
    column = 'log_risk'
    if split == 'train' and base.source == 'out_of_fold':
      part, column = part[part['oof_log_risk'].notna()], 'oof_log_risk'
    if len(part) < 2 * groups or part['os_event'].sum() < 2:
      continue
    t, e = part['os_months'].to_numpy(np.float64), part['os_event'].to_numpy(np.float64)
    lp = part[column].to_numpy(np.float64)
    res: dict[str, Any] = {'n': len(part), 'events': int(e.sum()), 'log_risk': column}
    try:
      res['calibration_slope'] = calibration_slope(t, e, lp)
    except Exception as err:  # lifelines convergence on degenerate splits
      res['calibration_slope_undefined'] = f'{type(err).__name__}: {err}'
    res['calibration'] = {}
    for h in horizons:
      pred = base.survival(lp, [h])[:, 0]
      if not np.isfinite(pred).all() or h > t.max():
        continue
      table = horizon_calibration(t, e, pred, h, groups)
      observed = km_at(t, e, h)[0]
      res['calibration'][f'{h:g}'] = {
        'groups': table.to_dict(orient='records'),
        'mean_predicted': float(pred.mean()),
        'observed': observed,
        'in_the_large': float(observed - pred.mean()),
      }
    res.update(
      brier_scores(
        t,
        e,
        lambda g, lp=lp: base.survival(lp, g),
        lambda g, n=len(t): np.broadcast_to(base.population(g), (n, len(g))),
        horizons,
      )
    )
    out[split] = res
  return out


def summary_table(results: dict[str, Any]) -> pd.DataFrame:
  """One row per split and horizon: predicted vs observed, slope, Brier vs null, IBS."""
  rows = []
  for split in ('train', 'val', 'test'):
    res = results.get(split)
    if not res:
      continue
    for h, cal in res.get('calibration', {}).items():
      rows.append(
        {
          'split': split,
          'horizon (months)': h,
          'mean predicted': round(cal['mean_predicted'], 3),
          'KM observed': round(cal['observed'], 3),
          'slope': round(res['calibration_slope'], 3) if 'calibration_slope' in res else None,
          'Brier': _r(res.get(f'brier_{h}')),
          'Brier (KM null)': _r(res.get(f'brier_null_{h}')),
          'IBS': _r(res.get('ibs')),
          'IBS (KM null)': _r(res.get('ibs_null')),
        }
      )
  return pd.DataFrame(rows)


def _r(x):
  return None if x is None else round(float(x), 4)


def plot_calibration(results: dict[str, Any], split: str, ax=None):
  """Predicted vs KM observed survival per risk quintile, one line per horizon."""
  import matplotlib.pyplot as plt

  if ax is None:
    _, ax = plt.subplots(figsize=(5, 5))
  res = results.get(split, {})
  for i, (h, cal) in enumerate(res.get('calibration', {}).items()):
    g = pd.DataFrame(cal['groups'])
    yerr = np.abs(np.vstack([g.observed - g.observed_lo, g.observed_hi - g.observed]))
    ax.errorbar(
      g.predicted, g.observed, yerr=yerr, fmt='o-', ms=4, capsize=2, color=f'C{i}',
      label=f'{h} months',
    )  # fmt: skip
  ax.plot([0, 1], [0, 1], ls='--', color='0.6', lw=0.8, label='Ideal')
  slope = res.get('calibration_slope')
  title = f'OS calibration ({split})' + (f', slope {slope:.2f}' if slope is not None else '')
  ax.set(
    xlabel='Predicted OS probability',
    ylabel='Kaplan-Meier observed',
    xlim=(0, 1),
    ylim=(0, 1.02),
    title=title,
  )
  ax.legend(loc='upper left', fontsize=8)
  return ax
