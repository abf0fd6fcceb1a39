"""Clinical metrics for IC response (binary) and overall survival (censored).

Well-kept libraries do the work where they exist (scikit-learn for ROC curves
and Brier score, lifelines for the log-rank test and Cox models). What is
written here (DeLong's variance, Harrell's C and the IPCW time-dependent AUC by
sorting and counting, bootstraps counted for many resamples at once,
decision-curve net benefit, the logistic calibration fit) is small and checked
in tests against published values, lifelines, scikit-survival or statsmodels,
and the survival metrics against the O(n^2) code they replaced.

Conventions: `score` is higher for the positive class; `risk` is higher for an
earlier event. Metrics that cannot be computed on the data given raise
`UndefinedMetric` with the reason, so callers can report it instead of crashing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import optimize, stats

# Fewer events than this and the log-rank P is reported with a warning.
MIN_EVENTS_LOGRANK = 10

# Resamples x patients (or distinct scores) counted at once by the vectorised bootstraps.
_BOOTSTRAP_CELLS = 1 << 20


class UndefinedMetric(ValueError):
  """The metric does not exist for these data (e.g. one class only); the message says why."""


# --------------------------------------------------------------------------- input checks


def _as_1d(x, name: str, dtype=np.float64) -> np.ndarray:
  arr = np.asarray(x, dtype=dtype)
  if arr.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {arr.shape}')
  return arr


def _finite(x, name: str) -> np.ndarray:
  arr = _as_1d(x, name)
  bad = np.flatnonzero(~np.isfinite(arr))
  if bad.size:
    raise ValueError(f'{name} has {bad.size} non-finite values at positions {bad[:10].tolist()}')
  return arr


def _binary(y, name: str = 'y') -> np.ndarray:
  arr = _finite(y, name)
  if not np.isin(arr, (0.0, 1.0)).all():
    raise ValueError(f'{name} must contain only 0 and 1, got values {np.unique(arr)[:10].tolist()}')
  return arr.astype(np.int64)


def _same_length(**arrays: np.ndarray) -> None:
  lengths = {k: len(v) for k, v in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f'lengths differ: {lengths}')


def _two_classes(y: np.ndarray) -> None:
  n_pos = int(y.sum())
  if n_pos == 0 or n_pos == len(y):
    only = 'positive' if n_pos else 'negative'
    raise UndefinedMetric(f'AUC undefined: all {len(y)} patients are {only} (one class only)')


def _survival(time, event) -> tuple[np.ndarray, np.ndarray]:
  t = _finite(time, 'time')
  e = _binary(event, 'event').astype(bool)
  _same_length(time=t, event=e)
  if (t < 0).any():
    raise ValueError(f'time must be >= 0, got min {t.min()}')
  return t, e


# --------------------------------------------------------------------------- ROC AUC: DeLong


def _midrank(x: np.ndarray) -> np.ndarray:
  """Ranks 1..n with ties given their average rank."""
  return stats.rankdata(x, method='average')


def _delong_components(y: np.ndarray, scores: np.ndarray):
  """AUCs and the DeLong covariance matrix for k score vectors (k, n) on the same patients.

  Fast version of DeLong et al. (1988) by Sun & Xu (2014): placement values from midranks.
  """
  pos, neg = scores[:, y == 1], scores[:, y == 0]
  m, n = pos.shape[1], neg.shape[1]
  k = scores.shape[0]
  aucs = np.empty(k)
  v10 = np.empty((k, m))  # placement of each positive among negatives
  v01 = np.empty((k, n))  # placement of each negative among positives
  for r in range(k):
    rank_pos = _midrank(pos[r])
    rank_neg = _midrank(neg[r])
    rank_all = _midrank(np.concatenate([pos[r], neg[r]]))
    aucs[r] = (rank_all[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10[r] = (rank_all[:m] - rank_pos) / n
    v01[r] = 1.0 - (rank_all[m:] - rank_neg) / m
  s10 = np.atleast_2d(np.cov(v10))
  s01 = np.atleast_2d(np.cov(v01))
  return aucs, s10 / m + s01 / n


def roc_auc(y, score) -> float:
  """Area under the ROC curve (Mann-Whitney, ties count one half); needs both classes."""
  y = _binary(y)
  score = _finite(score, 'score')
  _same_length(y=y, score=score)
  _two_classes(y)
  return float(_auc(y, score))


def labelled_auc_or_nan(y, score) -> float:
  """AUC over the rows with a label (y not NaN); NaN when undefined, for training curves."""
  y, score = np.asarray(y, float), np.asarray(score, float)
  ok = ~np.isnan(y)
  try:
    return roc_auc(y[ok].astype(int), score[ok])
  except UndefinedMetric:
    return float('nan')


def cindex_or_nan(time, event, risk) -> float:
  """Harrell's C over the rows with a follow-up time; NaN when undefined, for training curves."""
  time = np.asarray(time, float)
  ok = ~np.isnan(time)
  try:
    return concordance_index(time[ok], np.asarray(event)[ok], np.asarray(risk)[ok])
  except UndefinedMetric:
    return float('nan')


def delong_auc_variance(y, score) -> tuple[float, float]:
  """(AUC, DeLong variance of the AUC)."""
  y = _binary(y)
  score = _finite(score, 'score')
  _same_length(y=y, score=score)
  _two_classes(y)
  if min(int(y.sum()), int(len(y) - y.sum())) < 2:
    raise UndefinedMetric('AUC variance undefined: DeLong needs at least 2 patients in each class')
  aucs, cov = _delong_components(y, score[None])
  return float(aucs[0]), float(cov[0, 0])


def roc_auc_ci(
  y, score, *, method: str = 'delong', alpha: float = 0.05, n_bootstrap: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
  """(AUC, lower, upper): the (1 - alpha) CI by DeLong (normal, clipped to [0, 1]) or bootstrap.

  The bootstrap is stratified by class (percentile interval) so every resample has both classes:
  resample b draws the positives, then the negatives, with replacement (`rng.choice`, in turn
  from `np.random.default_rng(seed)`); all resamples are counted at once from how often each
  distinct score was drawn, O(n) each.
  """
  if method == 'delong':
    auc, var = delong_auc_variance(y, score)
    half = stats.norm.ppf(1 - alpha / 2) * np.sqrt(var)
    return auc, float(max(0.0, auc - half)), float(min(1.0, auc + half))
  if method != 'bootstrap':
    raise ValueError(f"method must be 'delong' or 'bootstrap', got {method!r}")
  y = _binary(y)
  score = _finite(score, 'score')
  _same_length(y=y, score=score)
  _two_classes(y)
  auc = _auc(y, score)
  rng = np.random.default_rng(seed)
  rank = np.unique(score, return_inverse=True)[1]
  pos, neg = rank[y == 1], rank[y == 0]
  n_levels = int(rank.max()) + 1
  chunk = max(1, min(n_bootstrap, _BOOTSTRAP_CELLS // n_levels))
  boot = []
  for first in range(0, n_bootstrap, chunk):
    k = min(chunk, n_bootstrap - first)
    # Resampled patients per distinct score: the same draws as rng.choice(pos) / rng.choice(neg).
    drawn_pos, drawn_neg = np.empty((k, n_levels)), np.empty((k, n_levels))
    for b in range(k):
      drawn_pos[b] = np.bincount(pos[rng.choice(pos.size, pos.size)], minlength=n_levels)
      drawn_neg[b] = np.bincount(neg[rng.choice(neg.size, neg.size)], minlength=n_levels)
    neg_below = _prefix_sums(drawn_neg)[:, :-1]
    # Mann-Whitney U: negatives below each positive, ties one half (multiples of 1/2: exact).
    u = np.einsum('bj,bj->b', drawn_pos, neg_below + drawn_neg / 2)
    boot.append(u / (pos.size * neg.size))
  lo, hi = np.quantile(np.concatenate(boot), [alpha / 2, 1 - alpha / 2])
  return auc, float(lo), float(hi)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
  m = int(y.sum())
  n = len(y) - m
  ranks = _midrank(score)
  return float((ranks[y == 1].sum() - m * (m + 1) / 2) / (m * n))


def delong_test(y, score_a, score_b) -> tuple[float, float]:
  """Paired two-sided DeLong test of AUC(a) = AUC(b) on the same patients: (z, p)."""
  *_, z, p = delong_difference(y, score_a, score_b)
  return z, p


def delong_difference(y, score_a, score_b, *, alpha: float = 0.05):
  """(AUC(a) - AUC(b), lower, upper, z, p): the paired DeLong test of `delong_test` and the
  normal (1 - alpha) interval of the difference from the same variance."""
  y = _binary(y)
  a = _finite(score_a, 'score_a')
  b = _finite(score_b, 'score_b')
  _same_length(y=y, score_a=a, score_b=b)
  _two_classes(y)
  if min(int(y.sum()), int(len(y) - y.sum())) < 2:
    raise UndefinedMetric('DeLong test undefined: needs at least 2 patients in each class')
  aucs, cov = _delong_components(y, np.stack([a, b]))
  diff = float(aucs[0] - aucs[1])
  var = max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0)
  if var == 0:
    if diff == 0:
      return 0.0, 0.0, 0.0, 0.0, 1.0
    raise UndefinedMetric('DeLong test undefined: zero variance of the AUC difference')
  se = np.sqrt(var)
  half = stats.norm.ppf(1 - alpha / 2) * se
  z = diff / se
  return diff, diff - half, diff + half, float(z), float(2 * stats.norm.sf(abs(z)))


def paired_bootstrap_ci(statistic, n: int, *, n_bootstrap: int = 1000, seed: int = 0, alpha=0.05):
  """(lower, upper): percentile interval of `statistic(idx)` over patient resamples.

  Resample b is `rng.integers(0, n, n)`, in turn from `np.random.default_rng(seed)`; the same
  indices go to both models of a difference, so the interval is paired. A resample on which
  the statistic is undefined (UndefinedMetric or NaN: one class, no comparable pair) is left
  out; the interval is undefined when more than half are.
  """
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(n_bootstrap):
    idx = rng.integers(0, n, n)
    try:
      v = float(statistic(idx))
    except UndefinedMetric:
      continue
    if np.isfinite(v):
      values.append(v)
  if len(values) < n_bootstrap // 2 or not values:
    raise UndefinedMetric(
      f'bootstrap interval undefined: only {len(values)} of {n_bootstrap} resamples defined'
    )
  lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
  return float(lo), float(hi)


def auc_difference_ci(y, score_a, score_b, *, n_bootstrap: int = 1000, seed: int = 0, alpha=0.05):
  """(AUC(a) - AUC(b), lower, upper): paired patient bootstrap (`paired_bootstrap_ci`)."""
  y = _binary(y)
  a = _finite(score_a, 'score_a')
  b = _finite(score_b, 'score_b')
  _same_length(y=y, score_a=a, score_b=b)
  _two_classes(y)

  def diff(idx):
    yy = y[idx]
    if yy.min() == yy.max():
      return np.nan
    return _auc(yy, a[idx]) - _auc(yy, b[idx])

  lo, hi = paired_bootstrap_ci(diff, len(y), n_bootstrap=n_bootstrap, seed=seed, alpha=alpha)
  return float(_auc(y, a) - _auc(y, b)), lo, hi


def cindex_difference_ci(
  time, event, risk_a, risk_b, *, n_bootstrap: int = 1000, seed: int = 0, alpha=0.05
):
  """(C(a) - C(b), lower, upper): Harrell's C difference, paired patient bootstrap."""
  t, e, a = _survival_scores(time, event, risk_a)
  b = _finite(risk_b, 'risk_b')
  _same_length(time=t, risk_b=b)
  c = concordance_index(t, e, a) - concordance_index(t, e, b)

  def diff(idx):
    return concordance_index(t[idx], e[idx], a[idx]) - concordance_index(t[idx], e[idx], b[idx])

  lo, hi = paired_bootstrap_ci(diff, len(t), n_bootstrap=n_bootstrap, seed=seed, alpha=alpha)
  return float(c), lo, hi


# --------------------------------------------------------------------------- threshold metrics


def youden_threshold(y, score) -> float:
  """Score threshold maximising sensitivity + specificity - 1 (positive when score >= threshold)."""
  from sklearn.metrics import roc_curve

  y = _binary(y)
  score = _finite(score, 'score')
  _same_length(y=y, score=score)
  _two_classes(y)
  fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
  finite = np.isfinite(thresholds)
  j = np.argmax(np.where(finite, tpr - fpr, -np.inf))
  return float(thresholds[j])


@dataclasses.dataclass(frozen=True)
class ConfusionMetrics:
  threshold: float
  tp: int
  fp: int
  tn: int
  fn: int

  @staticmethod
  def _ratio(a: int, b: int) -> float:
    return a / b if b else float('nan')

  @property
  def accuracy(self) -> float:
    return self._ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn)

  @property
  def sensitivity(self) -> float:
    return self._ratio(self.tp, self.tp + self.fn)

  @property
  def specificity(self) -> float:
    return self._ratio(self.tn, self.tn + self.fp)

  @property
  def ppv(self) -> float:
    return self._ratio(self.tp, self.tp + self.fp)

  @property
  def npv(self) -> float:
    return self._ratio(self.tn, self.tn + self.fn)

  def as_dict(self) -> dict[str, float]:
    return {
      'threshold': self.threshold,
      'tp': self.tp,
      'fp': self.fp,
      'tn': self.tn,
      'fn': self.fn,
      'accuracy': self.accuracy,
      'sensitivity': self.sensitivity,
      'specificity': self.specificity,
      'ppv': self.ppv,
      'npv': self.npv,
    }


def confusion_at(y, score, threshold: float) -> ConfusionMetrics:
  """Counts and rates with `score >= threshold` called positive (NaN rate when its denominator is 0)."""
  y = _binary(y)
  score = _finite(score, 'score')
  _same_length(y=y, score=score)
  pred = score >= threshold
  return ConfusionMetrics(
    threshold=float(threshold),
    tp=int((pred & (y == 1)).sum()),
    fp=int((pred & (y == 0)).sum()),
    tn=int((~pred & (y == 0)).sum()),
    fn=int((~pred & (y == 1)).sum()),
  )


# --------------------------------------------------------------------------- calibration, decision curves


def brier_score(y, prob) -> float:
  y = _binary(y)
  prob = _finite(prob, 'prob')
  _same_length(y=y, prob=prob)
  return float(np.mean((prob - y) ** 2))


def _logistic_fit(y: np.ndarray, x: np.ndarray, offset: np.ndarray) -> np.ndarray:
  """Maximum-likelihood logistic regression y ~ x @ beta + offset (x includes the intercept)."""

  def nll(beta):
    eta = x @ beta + offset
    return float(np.sum(np.logaddexp(0.0, eta) - y * eta))

  def grad(beta):
    eta = x @ beta + offset
    return x.T @ (1.0 / (1.0 + np.exp(-eta)) - y)

  res = optimize.minimize(
    nll, np.zeros(x.shape[1]), jac=grad, method='BFGS', options={'gtol': 1e-10, 'maxiter': 1000}
  )
  return res.x


def calibration_intercept_slope(y, prob, *, eps: float = 1e-12) -> tuple[float, float]:
  """(calibration-in-the-large, calibration slope) as in Steyerberg's logistic recalibration.

  Slope: b in logit P(y) = a + b * logit(p); intercept: a in logit P(y) = a + logit(p)
  (slope fixed to 1). Ideal: intercept 0, slope 1; slope < 1 means overfitted predictions.
  """
  y = _binary(y)
  prob = _finite(prob, 'prob')
  _same_length(y=y, prob=prob)
  _two_classes(y)
  lp = np.log(np.clip(prob, eps, 1 - eps)) - np.log1p(-np.clip(prob, eps, 1 - eps))
  ones = np.ones((len(y), 1))
  slope = _logistic_fit(y, np.hstack([ones, lp[:, None]]), np.zeros(len(y)))[1]
  intercept = _logistic_fit(y, ones, lp)[0]
  return float(intercept), float(slope)


def calibration_bins(y, prob, *, n_bins: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean predicted, observed fraction, count) per quantile bin, for calibration plots."""
  y = _binary(y)
  prob = _finite(prob, 'prob')
  _same_length(y=y, prob=prob)
  edges = np.unique(np.quantile(prob, np.linspace(0, 1, n_bins + 1)))
  which = np.clip(np.searchsorted(edges[1:-1], prob, side='right'), 0, max(len(edges) - 2, 0))
  mean_pred, frac_pos, count = [], [], []
  for b in np.unique(which):
    sel = which == b
    mean_pred.append(prob[sel].mean())
    frac_pos.append(y[sel].mean())
    count.append(int(sel.sum()))
  return np.array(mean_pred), np.array(frac_pos), np.array(count)


def net_benefit(y, prob, thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """Decision-curve net benefit of the model and of treat-all at each threshold probability.

  NB(pt) = TP/n - FP/n * pt / (1 - pt), treating patients with prob >= pt (Vickers & Elkin 2006).
  Treat-none has net benefit 0 everywhere.
  """
  y = _binary(y)
  prob = _finite(prob, 'prob')
  _same_length(y=y, prob=prob)
  pt = np.asarray(thresholds, np.float64)
  if ((pt <= 0) | (pt >= 1)).any():
    raise ValueError('threshold probabilities must lie strictly between 0 and 1')
  n = len(y)
  treat = prob[None, :] >= pt[:, None]
  tp = (treat & (y[None] == 1)).sum(1) / n
  fp = (treat & (y[None] == 0)).sum(1) / n
  odds = pt / (1 - pt)
  prevalence = y.mean()
  return tp - fp * odds, prevalence - (1 - prevalence) * odds


# --------------------------------------------------------------------------- survival


# Harrell's C counts pairs in O(n log n) (lifelines' definition, checked against lifelines in the
# tests); a bootstrap counts many resamples at once, each given as how often every patient was
# drawn. Counts are whole numbers held in float64, exact below 2**53 (n up to 90 million).


@dataclasses.dataclass(frozen=True)
class _ConcordancePlan:
  """Where the comparable pairs of a cohort lie, whatever the weight of each patient.

  Patients are put in (time, censored) order: at a tied time, deaths before censorings. A death j
  and a patient i are comparable exactly when i's (time, censored) group comes after j's: i left
  later, or at the same time censored (two deaths at one time are not comparable), the rule of
  lifelines' `concordance_index`. A pair is counted at the highest bit L where the two group
  ranks differ: both lie in one block of 2**(L+1) groups, j in its lower half and i in its upper
  half. Sorting each upper half by risk makes the count for j a difference of prefix sums.
  """

  order: np.ndarray  # patients in (time, censored) order; weights are given in this order
  deaths: np.ndarray  # positions of the deaths in that order
  later: np.ndarray  # for each death, the first position of a later group
  # Per bit: (upper half sorted by (block, risk), deaths in a lower half, and for each such death
  # the positions in the sorted upper half where its block starts, where risks >= its risk start,
  # and where risks > its risk start).
  levels: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...]


def _concordance_plan(t: np.ndarray, e: np.ndarray, r: np.ndarray) -> _ConcordancePlan:
  order = np.lexsort((~e, t))
  ts, es = t[order], e[order]
  new_group = np.r_[True, (ts[1:] != ts[:-1]) | (es[1:] != es[:-1])]
  group = np.cumsum(new_group) - 1
  group_end = np.r_[np.flatnonzero(new_group)[1:], len(t)]
  q = np.unique(r[order], return_inverse=True)[1].astype(np.int64)
  n_q = int(q.max()) + 1
  deaths = np.flatnonzero(es)
  levels = []
  for bit in range(int(group[-1]).bit_length()):
    upper = ((group >> bit) & 1).astype(bool)
    block = group >> (bit + 1)
    hi = np.flatnonzero(upper)
    key = block[hi] * n_q + q[hi]
    by_key = np.argsort(key, kind='stable')
    hi, key = hi[by_key], key[by_key]
    lo = deaths[~upper[deaths]]
    block_key = block[lo] * n_q
    start = np.searchsorted(key, block_key, side='left')
    below = np.searchsorted(key, block_key + q[lo], side='left')
    upto = np.searchsorted(key, block_key + q[lo], side='right')
    keep = upto > start  # deaths with no upper-half patient at or below their risk add nothing
    if keep.any():
      levels.append((hi, lo[keep], start[keep], below[keep], upto[keep]))
  return _ConcordancePlan(order, deaths, group_end[group[deaths]], tuple(levels))


def _prefix_sums(w: np.ndarray) -> np.ndarray:
  out = np.zeros((w.shape[0], w.shape[1] + 1))
  np.cumsum(w, axis=1, out=out[:, 1:])
  return out


def _concordance_counts(
  plan: _ConcordancePlan, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(concordant, tied-risk, comparable) weighted pair counts for each row of weights w (k, n).

  w[b, p] is the weight of the patient at position p of `plan.order` (how often a bootstrap
  resample drew that patient); a pair counts w_i * w_j. With whole-number weights this is exactly
  Harrell's counts on the cohort with each patient repeated w times.
  """
  cum = _prefix_sums(w)
  w_death = w[:, plan.deaths]
  pairs = np.einsum('bj,bj->b', w_death, cum[:, -1:] - cum[:, plan.later])
  correct = np.zeros(w.shape[0])
  tied = np.zeros(w.shape[0])
  for hi, lo, start, below, upto in plan.levels:
    c = _prefix_sums(w[:, hi])
    w_lo = w[:, lo]
    c_below = c[:, below]
    correct += np.einsum('bj,bj->b', w_lo, c_below - c[:, start])
    tied += np.einsum('bj,bj->b', w_lo, c[:, upto] - c_below)
  return correct, tied, pairs


def _survival_scores(time, event, risk) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  t, e = _survival(time, event)
  r = _finite(risk, 'risk')
  _same_length(time=t, risk=r)
  if not e.any():
    raise UndefinedMetric('C-index undefined: no events')
  return t, e, r


def _harrell(plan: _ConcordancePlan, n: int) -> float:
  correct, tied, pairs = _concordance_counts(plan, np.ones((1, n)))
  if pairs[0] == 0:
    raise UndefinedMetric('C-index undefined: no comparable pairs')
  return float((correct[0] + tied[0] / 2) / pairs[0])


def concordance_index(time, event, risk) -> float:
  """Harrell's C: fraction of comparable pairs where the higher risk has the earlier event.

  Ties in risk count one half; a pair is comparable when the earlier time is an event, or at a
  tied time one is an event and the other censored (lifelines' `concordance_index` with
  predicted = -risk, to the last bit). O(n log n) time, O(n) memory.
  """
  t, e, r = _survival_scores(time, event, risk)
  return _harrell(_concordance_plan(t, e, r), len(t))


def concordance_index_ci(
  time, event, risk, *, alpha: float = 0.05, n_bootstrap: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
  """(C, lower, upper) with a percentile bootstrap CI over patients.

  Resample b draws n patients with replacement, `rng.integers(0, n, n)` in turn from
  `np.random.default_rng(seed)`; its C is Harrell's C of the resampled cohort, counted from how
  often each patient was drawn (many resamples at once, O(n log n) each). Resamples without a
  comparable pair are left out; the CI is undefined when more than half are.
  """
  t, e, r = _survival_scores(time, event, risk)
  n = len(t)
  plan = _concordance_plan(t, e, r)
  c = _harrell(plan, n)
  rng = np.random.default_rng(seed)
  chunk = max(1, min(n_bootstrap, _BOOTSTRAP_CELLS // n))
  boot = []
  for first in range(0, n_bootstrap, chunk):
    w = np.empty((min(chunk, n_bootstrap - first), n))
    for row in w:
      row[:] = np.bincount(rng.integers(0, n, n), minlength=n)[plan.order]
    correct, tied, pairs = _concordance_counts(plan, w)
    ok = pairs > 0
    boot.append((correct[ok] + tied[ok] / 2) / pairs[ok])
  boot = np.concatenate(boot) if boot else np.empty(0)
  if len(boot) < n_bootstrap // 2:
    raise UndefinedMetric(
      f'C-index CI undefined: only {len(boot)} of {n_bootstrap} '
      'bootstrap resamples had comparable pairs'
    )
  lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
  return c, float(lo), float(hi)


def _groups(group, n: int) -> np.ndarray:
  g = _binary(group, 'group').astype(bool)
  if len(g) != n:
    raise ValueError(f'group has {len(g)} values, time has {n}')
  return g


def logrank_test(time, event, group) -> tuple[float, float]:
  """Log-rank test between group 1 and group 0: (chi2, p) with 1 degree of freedom.

  Raises UndefinedMetric when a group is empty or there are no events.
  """
  from lifelines.statistics import logrank_test as lifelines_logrank

  t, e = _survival(time, event)
  g = _groups(group, len(t))
  if g.all() or not g.any():
    raise UndefinedMetric(f'log-rank undefined: all {len(t)} patients are in one risk group')
  if not e.any():
    raise UndefinedMetric(f'log-rank undefined: no events among {len(t)} patients')
  res = lifelines_logrank(t[g], t[~g], event_observed_A=e[g], event_observed_B=e[~g])
  return float(res.test_statistic), float(res.p_value)


def hazard_ratio(time, event, group, *, alpha: float = 0.05) -> tuple[float, float, float, float]:
  """Cox hazard ratio of group 1 against group 0: (HR, lower, upper, Wald p)."""
  import pandas as pd
  from lifelines import CoxPHFitter

  t, e = _survival(time, event)
  g = _groups(group, len(t))
  if g.all() or not g.any():
    raise UndefinedMetric('hazard ratio undefined: all patients are in one risk group')
  if not e[g].any() or not e[~g].any():
    raise UndefinedMetric(
      'hazard ratio undefined: a risk group has no events '
      f'(high: {int(e[g].sum())}, low: {int(e[~g].sum())})'
    )
  df = pd.DataFrame({'time': t, 'event': e.astype(int), 'group': g.astype(float)})
  cph = CoxPHFitter(alpha=alpha).fit(df, 'time', 'event')
  s = cph.summary.loc['group']
  lo_col = [c for c in s.index if c.startswith('exp(coef) lower')][0]
  hi_col = [c for c in s.index if c.startswith('exp(coef) upper')][0]
  return float(s['exp(coef)']), float(s[lo_col]), float(s[hi_col]), float(s['p'])


def _censoring_survival(train_time: np.ndarray, train_event: np.ndarray):
  """Kaplan-Meier of the censoring distribution G(t) = P(C > t) as a step function.

  At tied times, events are taken to happen before censorings (the usual IPCW convention).
  """
  times, at_time, counts = np.unique(train_time, return_inverse=True, return_counts=True)
  at_risk = (len(train_time) - np.r_[0, np.cumsum(counts)[:-1]]).astype(np.float64)
  deaths = np.bincount(at_time, weights=train_event.astype(np.float64), minlength=len(times))
  censored = counts - deaths
  denom = at_risk - deaths
  factor = np.where(censored > 0, 1.0 - censored / np.where(denom > 0, denom, 1.0), 1.0)
  surv = np.cumprod(factor)

  def g(t: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(times, t, side='right') - 1
    return np.where(idx >= 0, surv[np.clip(idx, 0, None)], 1.0)

  return g


def _first_at_most(x: np.ndarray, u: np.ndarray, bound: float, *, strict: bool) -> np.ndarray:
  """For each x, the first k with x - u[k] <= bound (< bound if strict) in floating point.

  u is sorted, so the rounded difference x - u[k] never increases with k and the k that satisfy
  the test are a suffix of u. A search on x - bound finds it up to rounding; the steps after
  it make the answer agree with the element-wise test exactly.
  """

  def ok(k):
    d = x - u[np.clip(k, 0, len(u) - 1)]
    return d < bound if strict else d <= bound

  k = np.searchsorted(u, x - bound, side='right' if strict else 'left')
  while (back := (k > 0) & ok(k - 1)).any():
    k[back] -= 1
  while (ahead := (k < len(u)) & ~ok(k)).any():
    k[ahead] += 1
  return k


def time_dependent_auc(
  train_time, train_event, time, event, risk, at: float, *, tied_tol: float = 1e-8
) -> float:
  """Cumulative/dynamic AUC at time `at` with inverse-probability-of-censoring weights (Uno 2007).

  Cases: event by `at`, weighted by 1/G(T_i) with G the censoring Kaplan-Meier of the training
  set; controls: still event-free after `at`. A case scores 1 against each control whose risk is
  lower by more than `tied_tol` and 1/2 against each within `tied_tol`, counted by sorting the
  controls (O(n log n) time, O(n) memory). Raises UndefinedMetric where follow-up does not reach
  `at` or there are no cases or controls.
  """
  tt, te = _survival(train_time, train_event)
  t, e = _survival(time, event)
  r = _finite(risk, 'risk')
  _same_length(time=t, risk=r)
  if np.isnan(tied_tol):
    raise ValueError('tied_tol must be a number, got nan')
  if at >= tt.max():
    raise UndefinedMetric(
      f'time-dependent AUC at {at:g} undefined: training follow-up ends at {tt.max():g}'
    )
  cases = e & (t <= at)
  controls = t > at
  if not cases.any():
    raise UndefinedMetric(f'time-dependent AUC at {at:g} undefined: no events by {at:g}')
  if not controls.any():
    raise UndefinedMetric(f'time-dependent AUC at {at:g} undefined: nobody followed beyond {at:g}')
  g = _censoring_survival(tt, te)(t[cases])
  if (g <= 0).any():
    raise UndefinedMetric(f'time-dependent AUC at {at:g} undefined: censoring survival is 0')
  w = 1.0 / g
  control_risk, n_at = np.unique(r[controls], return_counts=True)
  below = np.r_[0, np.cumsum(n_at)]  # controls before each distinct control risk
  case_risk = r[cases]
  # Wins: risk difference > max(tied_tol, 0); ties: |difference| <= tied_tol.
  first_not_won = _first_at_most(case_risk, control_risk, max(tied_tol, 0.0), strict=False)
  wins = below[first_not_won]
  ties = np.zeros_like(wins)
  if tied_tol >= 0:
    first_lost = _first_at_most(case_risk, control_risk, -tied_tol, strict=True)
    ties = below[first_lost] - wins
  return float((w * (wins + 0.5 * ties)).sum() / (w.sum() * controls.sum()))
