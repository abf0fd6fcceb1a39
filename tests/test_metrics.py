"""Metrics checked against scikit-learn, lifelines, statsmodels, scikit-survival and published values."""

import numpy as np
import pytest
from lifelines.datasets import load_gbsg2, load_rossi
from scipy import stats
from sklearn import metrics as skm

from moemil_jax import metrics

# Hanley & McNeil (1982), Radiology 143:29-36, Table 1: 109 CT images rated on a 5-point scale
# (1 = definitely normal ... 5 = definitely abnormal). Published AUC 0.893, SE 0.032 (their formula).
HM_NORMAL = [33, 6, 6, 11, 2]  # 58 truly normal
HM_ABNORMAL = [3, 2, 2, 11, 33]  # 51 truly abnormal


def hanley_mcneil_data():
  ratings = np.arange(1, 6)
  y = np.r_[np.zeros(sum(HM_NORMAL)), np.ones(sum(HM_ABNORMAL))].astype(int)
  score = np.r_[np.repeat(ratings, HM_NORMAL), np.repeat(ratings, HM_ABNORMAL)].astype(float)
  return y, score


def brute_force_placements(y, score):
  """DeLong's structural components straight from the definition (O(m n)), for cross-checking."""
  pos, neg = score[y == 1], score[y == 0]
  psi = (pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])
  return psi.mean(1), psi.mean(0)


@pytest.fixture(scope='module')
def rossi():
  df = load_rossi()
  rng = np.random.default_rng(0)
  # A noisy risk score with real signal (prior convictions, youth) and ties.
  risk = 0.3 * df['prio'] - 0.05 * df['age'] + rng.normal(0, 0.5, len(df))
  return df, risk.to_numpy()


def test_delong_reproduces_hanley_mcneil():
  y, score = hanley_mcneil_data()
  assert len(y) == 109
  auc, var = metrics.delong_auc_variance(y, score)
  assert round(auc, 3) == 0.893
  assert auc == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
  v10, v01 = brute_force_placements(y, score)
  se_reference = np.sqrt(v10.var(ddof=1) / len(v10) + v01.var(ddof=1) / len(v01))
  assert np.sqrt(var) == pytest.approx(se_reference, rel=1e-10)
  # DeLong's SE on these data is 0.0307; Hanley-McNeil's published exponential approximation 0.032.
  assert np.sqrt(var) == pytest.approx(0.0307, abs=5e-5)
  assert abs(np.sqrt(var) - 0.032) < 0.003
  auc2, lo, hi = metrics.roc_auc_ci(y, score)
  assert auc2 == auc and lo == pytest.approx(auc - 1.959964 * np.sqrt(var)) and hi > auc


def test_roc_auc_matches_sklearn_on_rossi(rossi):
  df, risk = rossi
  y = df['arrest'].to_numpy()
  for score in (risk, df['prio'].to_numpy(float)):  # prio has many ties
    auc, lo, hi = metrics.roc_auc_ci(y, score)
    assert auc == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    assert lo < auc < hi
    assert metrics.roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)


def test_training_curve_metrics_skip_unlabelled_rows_and_say_nan_when_undefined(rossi):
  df, risk = rossi
  y = df['arrest'].to_numpy(float)
  y[::7] = np.nan
  ok = ~np.isnan(y)
  assert metrics.labelled_auc_or_nan(y, risk) == pytest.approx(skm.roc_auc_score(y[ok], risk[ok]))
  # One positive only: the point AUC exists (DeLong's variance would not).
  one = np.r_[1.0, np.zeros(9)]
  assert metrics.labelled_auc_or_nan(one, np.arange(10.0)) == pytest.approx(0.0)
  assert np.isnan(metrics.labelled_auc_or_nan(np.zeros(5), np.arange(5.0)))
  t = df['week'].to_numpy(float)
  assert metrics.cindex_or_nan(t, df['arrest'], risk) == pytest.approx(
    metrics.concordance_index(t, df['arrest'], risk)
  )
  assert np.isnan(metrics.cindex_or_nan(t, np.zeros(len(t)), risk))


def test_bootstrap_ci_agrees_with_delong(rossi):
  df, risk = rossi
  y = df['arrest'].to_numpy()
  auc, lo, hi = metrics.roc_auc_ci(y, risk, method='delong')
  auc_b, lo_b, hi_b = metrics.roc_auc_ci(y, risk, method='bootstrap', n_bootstrap=1000)
  assert auc_b == pytest.approx(auc)
  assert lo_b == pytest.approx(lo, abs=0.02) and hi_b == pytest.approx(hi, abs=0.02)
  with pytest.raises(ValueError, match='method'):
    metrics.roc_auc_ci(y, risk, method='wald')


def test_delong_test_paired(rossi):
  df, risk = rossi
  y = df['arrest'].to_numpy()
  other = df['age'].to_numpy(float) * -1.0
  z, p = metrics.delong_test(y, risk, other)
  # Reference: variance of the AUC difference from brute-force placement values.
  a10, a01 = brute_force_placements(y, risk)
  b10, b01 = brute_force_placements(y, other)
  var = np.var(a10 - b10, ddof=1) / len(a10) + np.var(a01 - b01, ddof=1) / len(a01)
  diff = skm.roc_auc_score(y, risk) - skm.roc_auc_score(y, other)
  assert z == pytest.approx(diff / np.sqrt(var), rel=1e-9)
  assert p == pytest.approx(2 * stats.norm.sf(abs(z)))
  z2, p2 = metrics.delong_test(y, other, risk)
  assert z2 == pytest.approx(-z) and p2 == pytest.approx(p)
  assert metrics.delong_test(y, risk, risk) == (0.0, 1.0)


def test_one_class_is_undefined_with_reason():
  with pytest.raises(metrics.UndefinedMetric, match='one class'):
    metrics.roc_auc_ci(np.ones(5), np.arange(5.0))
  with pytest.raises(metrics.UndefinedMetric, match='one class'):
    metrics.delong_test(np.zeros(5), np.arange(5.0), np.arange(5.0))


def test_nan_scores_are_refused_with_positions():
  with pytest.raises(ValueError, match=r'positions \[2\]'):
    metrics.roc_auc_ci([0, 1, 0, 1], [0.1, 0.2, np.nan, 0.9])


def test_youden_and_confusion_match_sklearn(rossi):
  df, risk = rossi
  y = df['arrest'].to_numpy()
  thr = metrics.youden_threshold(y, risk)

  # Brute force over every observed score.
  def j(t):
    return skm.recall_score(y, risk >= t) + skm.recall_score(1 - y, risk < t)

  best = max(np.unique(risk), key=j)
  assert j(thr) == pytest.approx(j(best))
  cm = metrics.confusion_at(y, risk, thr)
  pred = (risk >= thr).astype(int)
  tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
  assert (cm.tp, cm.fp, cm.tn, cm.fn) == (tp, fp, tn, fn)
  assert cm.sensitivity == pytest.approx(skm.recall_score(y, pred))
  assert cm.specificity == pytest.approx(skm.recall_score(1 - y, 1 - pred))
  assert cm.ppv == pytest.approx(skm.precision_score(y, pred))
  assert cm.npv == pytest.approx(skm.precision_score(1 - y, 1 - pred))
  assert cm.accuracy == pytest.approx(skm.accuracy_score(y, pred))
  assert np.isnan(metrics.confusion_at(y, risk, np.inf).ppv)  # nobody called positive


def test_brier_and_calibration_match_sklearn_and_statsmodels(rossi):
  sm = pytest.importorskip('statsmodels.api')
  from sklearn.calibration import calibration_curve

  df, risk = rossi
  y = df['arrest'].to_numpy()
  prob = 1 / (1 + np.exp(-(risk - risk.mean())))
  assert metrics.brier_score(y, prob) == pytest.approx(skm.brier_score_loss(y, prob))
  intercept, slope = metrics.calibration_intercept_slope(y, prob)
  lp = np.log(prob / (1 - prob))
  ref_slope = sm.GLM(y, sm.add_constant(lp), family=sm.families.Binomial()).fit().params[1]
  ref_int = (
    sm.GLM(y, np.ones((len(y), 1)), family=sm.families.Binomial(), offset=lp).fit().params[0]
  )
  assert slope == pytest.approx(ref_slope, abs=1e-5)
  assert intercept == pytest.approx(ref_int, abs=1e-5)
  mean_pred, frac_pos, count = metrics.calibration_bins(y, prob, n_bins=5)
  ref_frac, ref_pred = calibration_curve(y, prob, n_bins=5, strategy='quantile')
  np.testing.assert_allclose(mean_pred, ref_pred, atol=1e-12)
  np.testing.assert_allclose(frac_pos, ref_frac, atol=1e-12)
  assert count.sum() == len(y)


def test_net_benefit_by_hand():
  y = np.array([1, 1, 0, 0, 0])
  prob = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
  model, treat_all = metrics.net_benefit(y, prob, [0.3, 0.5])
  # pt = 0.3: treated {0.9, 0.4, 0.6}: TP 2, FP 1 -> 2/5 - 1/5 * 3/7.
  assert model[0] == pytest.approx(2 / 5 - 1 / 5 * 0.3 / 0.7)
  # pt = 0.5: treated {0.9, 0.6}: TP 1, FP 1 -> 1/5 - 1/5.
  assert model[1] == pytest.approx(0.0)
  assert treat_all == pytest.approx(2 / 5 - 3 / 5 * np.array([0.3 / 0.7, 1.0]))
  np.testing.assert_allclose(metrics.net_benefit(y, np.ones(5), [0.3, 0.5])[0], treat_all)


def test_concordance_matches_lifelines_and_sksurv(rossi):
  from lifelines.utils import concordance_index as lifelines_c

  df, risk = rossi
  c = metrics.concordance_index(df['week'], df['arrest'], risk)
  assert c == pytest.approx(lifelines_c(df['week'], -risk, df['arrest']))
  sksurv_metrics = pytest.importorskip('sksurv.metrics')
  ref = sksurv_metrics.concordance_index_censored(df['arrest'].astype(bool), df['week'], risk)[0]
  assert c == pytest.approx(ref, abs=1e-3)
  assert c > 0.55  # the planted signal is found
  c2, lo, hi = metrics.concordance_index_ci(df['week'], df['arrest'], risk, n_bootstrap=300)
  assert c2 == c and lo < c < hi and hi - lo < 0.2


def test_logrank_matches_lifelines_and_statsmodels(rossi):
  from lifelines.statistics import logrank_test as lifelines_logrank

  df, risk = rossi
  high = (risk > np.median(risk)).astype(int)
  chi2, p = metrics.logrank_test(df['week'], df['arrest'], high)
  g = high == 1
  ref = lifelines_logrank(df['week'][g], df['week'][~g], df['arrest'][g], df['arrest'][~g])
  assert chi2 == pytest.approx(ref.test_statistic) and p == pytest.approx(ref.p_value)
  sm_duration = pytest.importorskip('statsmodels.duration.survfunc')
  chi2_sm, p_sm = sm_duration.survdiff(df['week'], df['arrest'], high)
  assert chi2 == pytest.approx(chi2_sm, rel=1e-6) and p == pytest.approx(p_sm, rel=1e-6)
  # The real covariate 'fin' (financial aid): the classic Rossi result, P about 0.05.
  _, p_fin = metrics.logrank_test(df['week'], df['arrest'], df['fin'])
  assert 0.03 < p_fin < 0.07


def test_logrank_and_hr_undefined_cases():
  t = np.array([1.0, 2, 3, 4])
  with pytest.raises(metrics.UndefinedMetric, match='no events'):
    metrics.logrank_test(t, [0, 0, 0, 0], [0, 1, 0, 1])
  with pytest.raises(metrics.UndefinedMetric, match='one risk group'):
    metrics.logrank_test(t, [1, 0, 1, 0], [1, 1, 1, 1])
  with pytest.raises(metrics.UndefinedMetric, match='no events'):
    metrics.hazard_ratio(t, [1, 0, 1, 0], [0, 1, 0, 1])


def test_hazard_ratio_matches_lifelines_and_statsmodels(rossi):
  from lifelines import CoxPHFitter

  sm_phreg = pytest.importorskip('statsmodels.duration.hazard_regression')
  df, _ = rossi
  hr, lo, hi, p = metrics.hazard_ratio(df['week'], df['arrest'], df['fin'])
  cph = CoxPHFitter().fit(df[['week', 'arrest', 'fin']], 'week', 'arrest')
  assert hr == pytest.approx(cph.hazard_ratios_['fin'])
  assert p == pytest.approx(cph.summary.loc['fin', 'p'])
  res = sm_phreg.PHReg(
    df['week'], df[['fin']].astype(float), status=df['arrest'], ties='efron'
  ).fit()
  assert hr == pytest.approx(np.exp(res.params[0]), rel=1e-4)
  ci = np.exp(res.conf_int()[0])
  assert lo == pytest.approx(ci[0], rel=1e-3) and hi == pytest.approx(ci[1], rel=1e-3)
  assert hr < 1  # financial aid lowers re-arrest hazard


def test_time_dependent_auc_matches_sksurv_on_gbsg2():
  sksurv_metrics = pytest.importorskip('sksurv.metrics')
  from sksurv.util import Surv

  df = load_gbsg2()  # German Breast Cancer Study Group 2: 686 patients, time in days
  risk = (0.05 * df['pnodes'] - 0.001 * df['progrec'] + 0.01 * df['tsize']).to_numpy()
  time, event = df['time'].to_numpy(float), df['cens'].to_numpy()
  train = np.random.default_rng(0).random(len(df)) < 0.6
  y_train = Surv.from_arrays(event[train].astype(bool), time[train])
  y_test = Surv.from_arrays(event[~train].astype(bool), time[~train])
  for years in (1, 3, 5):
    at = 365.25 * years
    ref = sksurv_metrics.cumulative_dynamic_auc(y_train, y_test, risk[~train], [at])[0][0]
    mine = metrics.time_dependent_auc(
      time[train], event[train], time[~train], event[~train], risk[~train], at
    )
    assert mine == pytest.approx(ref, abs=1e-12), years
  with pytest.raises(metrics.UndefinedMetric, match='follow-up'):
    metrics.time_dependent_auc(
      time[train], event[train], time[~train], event[~train], risk[~train], 10 * 365.25
    )


# --------------------------------------------------------------------------- evaluation at scale
# The O(n log n) C-index, the vectorised bootstraps and the sort-and-count time-dependent AUC
# against the implementations they replaced (kept here as references) and lifelines / sksurv.


def tied_cohorts(count, seed):
  """Small cohorts with many tied times (0 included), tied risks and any share of censoring."""
  rng = np.random.default_rng(seed)
  for _ in range(count):
    n = int(rng.integers(2, 60))
    time = rng.integers(0, rng.integers(1, 12), n).astype(float)
    event = rng.random(n) < rng.random()
    risk = rng.integers(0, rng.integers(1, 8), n) * 0.25
    yield time, event, risk


def brute_force_harrell_counts(time, event, risk):
  """(concordant, tied-risk, comparable) pairs straight from lifelines' rules, O(n^2)."""
  correct = tied = pairs = 0
  for j in np.flatnonzero(event):
    comparable = (time > time[j]) | ((time == time[j]) & ~event)
    pairs += int(comparable.sum())
    correct += int((comparable & (risk < risk[j])).sum())
    tied += int((comparable & (risk == risk[j])).sum())
  return correct, tied, pairs


def reference_concordance_index_ci(time, event, risk, *, alpha=0.05, n_bootstrap=1000, seed=0):
  """The explicit-resampling bootstrap this replaced: lifelines on every resampled cohort."""
  from lifelines.utils import concordance_index as lifelines_c

  t, e, r = np.asarray(time, float), np.asarray(event).astype(bool), np.asarray(risk, float)
  try:
    c = lifelines_c(t, -r, e)
  except ZeroDivisionError:  # no comparable pairs (or no events): None, as when the CI is
    return None
  rng = np.random.default_rng(seed)
  boot = []
  for _ in range(n_bootstrap):
    idx = rng.integers(0, len(t), len(t))
    if not e[idx].any():
      continue
    try:
      boot.append(lifelines_c(t[idx], -r[idx], e[idx]))
    except ZeroDivisionError:
      continue
  if len(boot) < n_bootstrap // 2:
    return None
  lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
  return c, float(lo), float(hi)


def reference_auc_bootstrap(y, score, *, alpha=0.05, n_bootstrap=2000, seed=0):
  """The stratified bootstrap loop this replaced (Mann-Whitney from midranks per resample)."""

  def auc(p, q):
    ranks = stats.rankdata(np.r_[p, q])
    return (ranks[: p.size].sum() - p.size * (p.size + 1) / 2) / (p.size * q.size)

  rng = np.random.default_rng(seed)
  pos, neg = score[y == 1], score[y == 0]
  boot = []
  for _ in range(n_bootstrap):
    p = rng.choice(pos, size=pos.size, replace=True)
    q = rng.choice(neg, size=neg.size, replace=True)
    boot.append(auc(p, q))
  lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
  return auc(pos, neg), float(lo), float(hi)


def reference_censoring_survival(train_time, train_event):
  """The O(unique times x n) censoring Kaplan-Meier this replaced."""
  times = np.unique(train_time)
  at_risk = np.array([(train_time >= s).sum() for s in times], np.float64)
  deaths = np.array([((train_time == s) & train_event).sum() for s in times], np.float64)
  censored = np.array([((train_time == s) & ~train_event).sum() for s in times], np.float64)
  denom = at_risk - deaths
  factor = np.where(censored > 0, 1.0 - censored / np.where(denom > 0, denom, 1.0), 1.0)
  surv = np.cumprod(factor)

  def g(t):
    idx = np.searchsorted(times, t, side='right') - 1
    return np.where(idx >= 0, surv[np.clip(idx, 0, None)], 1.0)

  return g


def reference_time_dependent_auc(train_time, train_event, time, event, risk, at, tied_tol=1e-8):
  """The cases x controls matrix this replaced (None where undefined)."""
  cases = event & (time <= at)
  controls = time > at
  if at >= train_time.max() or not cases.any() or not controls.any():
    return None
  g = reference_censoring_survival(train_time, train_event)(time[cases])
  if (g <= 0).any():
    return None
  w = 1.0 / g
  diff = risk[cases][:, None] - risk[controls][None, :]
  tied = np.abs(diff) <= tied_tol
  wins = np.where(tied, 0.5, (diff > 0).astype(np.float64))
  return float((w[:, None] * wins).sum() / (w.sum() * controls.sum()))


def test_fast_concordance_equals_lifelines_and_sksurv_bit_for_bit():
  from lifelines.utils import concordance_index as lifelines_c

  sksurv_metrics = pytest.importorskip('sksurv.metrics')
  checked = 0
  for time, event, risk in tied_cohorts(400, seed=0):
    try:
      ref = lifelines_c(time, -risk, event)
    except ZeroDivisionError:
      ref = None
    try:
      mine = metrics.concordance_index(time, event, risk)
    except metrics.UndefinedMetric as err:
      assert ref is None or not event.any(), str(err)
      continue
    assert mine == ref  # the same whole-number counts, the same division
    # sksurv ties risks within 1e-8; these risks are 0.25 apart, so it must agree too.
    assert mine == pytest.approx(
      sksurv_metrics.concordance_index_censored(event, time, risk)[0], abs=1e-12
    )
    checked += 1
  assert checked > 300
  # Larger, with real-valued times and risks.
  rng = np.random.default_rng(1)
  time = np.round(rng.exponential(30, 5000), 1)
  event = rng.random(5000) < 0.4
  risk = np.round(rng.normal(size=5000) - time / 30, 2)
  assert metrics.concordance_index(time, event, risk) == lifelines_c(time, -risk, event)


def test_concordance_undefined_cases():
  with pytest.raises(metrics.UndefinedMetric, match='no events'):
    metrics.concordance_index([1.0, 2.0, 3.0], [0, 0, 0], [1.0, 2.0, 3.0])
  with pytest.raises(metrics.UndefinedMetric, match='no comparable pairs'):
    metrics.concordance_index([2.0, 2.0, 1.0], [1, 1, 0], [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match='lengths differ'):
    metrics.concordance_index([1.0, 2.0], [1, 0], [1.0, 2.0, 3.0])


def test_weighted_concordance_counts_equal_the_repeated_cohort():
  rng = np.random.default_rng(2)
  for time, event, risk in tied_cohorts(60, seed=3):
    plan = metrics._concordance_plan(time, event, risk)
    weights = rng.integers(0, 4, (3, len(time)))
    correct, tied, pairs = metrics._concordance_counts(plan, weights[:, plan.order].astype(float))
    for b, w in enumerate(weights):
      ref = brute_force_harrell_counts(np.repeat(time, w), np.repeat(event, w), np.repeat(risk, w))
      assert (correct[b], tied[b], pairs[b]) == ref


def test_concordance_ci_equals_explicit_resampling_with_the_same_draws(rossi):
  df, risk = rossi
  t, e = df['week'].to_numpy(float), df['arrest'].to_numpy()
  for seed in (0, 1):
    ref = reference_concordance_index_ci(t, e, risk, n_bootstrap=200, seed=seed)
    assert metrics.concordance_index_ci(t, e, risk, n_bootstrap=200, seed=seed) == ref
  assert metrics.concordance_index_ci(t, e, risk, alpha=0.1, n_bootstrap=150, seed=4) == (
    reference_concordance_index_ci(t, e, risk, alpha=0.1, n_bootstrap=150, seed=4)
  )
  # Small tied cohorts, where resamples without comparable pairs are left out (or too many are).
  undefined = 0
  for i, (time, event, r) in enumerate(tied_cohorts(80, seed=5)):
    if not event.any():
      continue
    ref = reference_concordance_index_ci(time, event, r, n_bootstrap=40, seed=i)
    try:
      mine = metrics.concordance_index_ci(time, event, r, n_bootstrap=40, seed=i)
    except metrics.UndefinedMetric as err:
      assert ref is None and 'comparable pairs' in str(err)
      undefined += 1
      continue
    assert mine == ref
  assert undefined > 0


def test_concordance_ci_chunks_give_the_same_answer(monkeypatch, rossi):
  df, risk = rossi
  args = df['week'].to_numpy(float), df['arrest'].to_numpy(), risk
  whole = metrics.concordance_index_ci(*args, n_bootstrap=50, seed=7)
  monkeypatch.setattr(metrics, '_BOOTSTRAP_CELLS', 3 * len(risk))  # chunks of 3 resamples
  assert metrics.concordance_index_ci(*args, n_bootstrap=50, seed=7) == whole


def test_auc_bootstrap_equals_explicit_resampling_with_the_same_draws(rossi, monkeypatch):
  df, risk = rossi
  y = df['arrest'].to_numpy()
  prio = df['prio'].to_numpy(float)  # many ties
  for score, seed in ((risk, 0), (prio, 1)):
    ref = reference_auc_bootstrap(y, score, n_bootstrap=300, seed=seed)
    assert metrics.roc_auc_ci(y, score, method='bootstrap', n_bootstrap=300, seed=seed) == ref
  monkeypatch.setattr(metrics, '_BOOTSTRAP_CELLS', 7)
  y, score = hanley_mcneil_data()
  ref = reference_auc_bootstrap(y, score, alpha=0.1, n_bootstrap=100, seed=3)
  got = metrics.roc_auc_ci(y, score, method='bootstrap', alpha=0.1, n_bootstrap=100, seed=3)
  assert got == ref


def test_censoring_survival_equals_the_reference_and_sksurv():
  from sksurv.nonparametric import kaplan_meier_estimator

  rng = np.random.default_rng(6)
  for _ in range(100):
    n = int(rng.integers(1, 50))
    time = rng.integers(0, rng.integers(1, 15), n).astype(float)
    event = rng.random(n) < rng.random()
    query = np.r_[np.linspace(-1, 16, 69), time]
    g = metrics._censoring_survival(time, event)
    np.testing.assert_array_equal(g(query), reference_censoring_survival(time, event)(query))
    # scikit-survival's reverse Kaplan-Meier (what cumulative_dynamic_auc weights by).
    at, surv = kaplan_meier_estimator(event, time, reverse=True)
    np.testing.assert_allclose(g(at), surv, rtol=0, atol=1e-12)


def test_time_dependent_auc_equals_the_matrix_and_sksurv_with_ties():
  sksurv_metrics = pytest.importorskip('sksurv.metrics')
  from sksurv.util import Surv

  rng = np.random.default_rng(7)
  compared = with_sksurv = 0
  for _ in range(150):
    n_train, n = int(rng.integers(3, 80)), int(rng.integers(2, 80))
    train_time = rng.integers(0, 18, n_train).astype(float)
    train_event = rng.random(n_train) < 0.5
    time = rng.integers(0, 15, n).astype(float)
    event = rng.random(n) < 0.5
    # Risks on a 0.1 grid nudged by ~tied_tol: differences straddle the tie tolerance.
    risk = rng.integers(0, 5, n) * 0.1 + rng.choice([0.0, 1e-8, 2e-8, -1e-8, 5e-9], n)
    at = float(rng.integers(1, 12))
    for tol in (1e-8, 0.0, 0.15):
      ref = reference_time_dependent_auc(train_time, train_event, time, event, risk, at, tol)
      if ref is None:
        with pytest.raises(metrics.UndefinedMetric):
          metrics.time_dependent_auc(train_time, train_event, time, event, risk, at, tied_tol=tol)
        continue
      mine = metrics.time_dependent_auc(
        train_time, train_event, time, event, risk, at, tied_tol=tol
      )
      assert mine == pytest.approx(ref, abs=1e-12)
      compared += 1
    # sksurv groups risks by chained np.isclose (rtol 1e-5): compare on the grid without nudges.
    grid = np.round(risk, 1)
    defined = reference_time_dependent_auc(train_time, train_event, time, event, grid, at)
    if defined is not None and time.max() < train_time.max():  # sksurv's range requirement
      try:
        sk = sksurv_metrics.cumulative_dynamic_auc(
          Surv.from_arrays(train_event, train_time), Surv.from_arrays(event, time), grid, [at]
        )[0][0]
      except ValueError:  # undefined there too (no cases, censoring survival 0, ...)
        continue
      mine = metrics.time_dependent_auc(train_time, train_event, time, event, grid, at)
      assert mine == pytest.approx(sk, abs=1e-12)
      with_sksurv += 1
  assert compared > 100 and with_sksurv > 20


def test_time_dependent_auc_on_a_large_cohort_is_linear_memory():
  # About 9,000 cases x 8,000 controls: each cases x controls float64 matrix the old code built
  # was 0.5 GB; sorting and counting needs a few MB.
  from moemil_jax.bench import evaluation as bench_evaluation

  t, e, r = bench_evaluation.cohort(20_000, seed=0)
  train_t, train_e, _ = bench_evaluation.cohort(20_000, seed=1)
  auc, _, peak_mb = bench_evaluation._peak_mb(
    lambda: metrics.time_dependent_auc(train_t, train_e, t, e, r, 36.0)
  )
  assert 0.6 < auc < 0.9 and peak_mb < 100
  # The first 2,000 patients, against the matrix.
  ref = reference_time_dependent_auc(
    train_t[:2000], train_e[:2000] > 0, t[:2000], e[:2000] > 0, r[:2000], 36.0
  )
  mine = metrics.time_dependent_auc(
    train_t[:2000], train_e[:2000], t[:2000], e[:2000], r[:2000], 36.0
  )
  assert mine == pytest.approx(ref, abs=1e-12)


def test_evaluation_bench_reports_its_figures():
  from moemil_jax.bench import evaluation as bench_evaluation

  out = bench_evaluation.run(quick=True, n_bootstrap=20, lifelines_resamples=0)
  assert out['n'] == 10_000 and out['eval_cindex_ci_s'] > 0
  assert 0 < out['eval_tdauc_mb'] < 50 < out['old_tdauc_one_matrix_mb']
  lo, hi = out['c_index_ci']
  assert lo < out['c_index'] < hi


def test_paired_bootstrap_differences_match_a_direct_computation(rossi):
  """The paired intervals against the same resamples scored by scikit-learn and lifelines."""
  from lifelines.utils import concordance_index as lifelines_c

  df, risk = rossi
  df, risk = df.iloc[:120], risk[:120]  # a fixed example, small enough to loop over directly
  y, t = df['arrest'].to_numpy(), df['week'].to_numpy(float)
  other = -df['age'].to_numpy(float)
  diff, lo, hi = metrics.auc_difference_ci(y, risk, other, n_bootstrap=300, seed=3)
  rng = np.random.default_rng(3)
  direct = []
  for _ in range(300):
    idx = rng.integers(0, len(y), len(y))
    if y[idx].min() != y[idx].max():
      direct.append(skm.roc_auc_score(y[idx], risk[idx]) - skm.roc_auc_score(y[idx], other[idx]))
  assert diff == pytest.approx(skm.roc_auc_score(y, risk) - skm.roc_auc_score(y, other))
  assert (lo, hi) == pytest.approx(tuple(np.quantile(direct, [0.025, 0.975])), abs=1e-12)
  assert lo < diff < hi

  c, lo, hi = metrics.cindex_difference_ci(t, y, risk, other, n_bootstrap=300, seed=3)
  rng = np.random.default_rng(3)
  direct = []
  for _ in range(300):
    idx = rng.integers(0, len(y), len(y))
    direct.append(
      lifelines_c(t[idx], -risk[idx], y[idx]) - lifelines_c(t[idx], -other[idx], y[idx])
    )
  assert c == pytest.approx(lifelines_c(t, -risk, y) - lifelines_c(t, -other, y))
  assert (lo, hi) == pytest.approx(tuple(np.quantile(direct, [0.025, 0.975])), abs=1e-12)


def test_delong_difference_interval_and_test(rossi):
  df, risk = rossi
  y = df['arrest'].to_numpy()
  other = -df['age'].to_numpy(float)
  diff, lo, hi, z, p = metrics.delong_difference(y, risk, other)
  assert (z, p) == pytest.approx(metrics.delong_test(y, risk, other))
  se = (hi - lo) / (2 * stats.norm.ppf(0.975))
  assert diff == pytest.approx(skm.roc_auc_score(y, risk) - skm.roc_auc_score(y, other))
  assert z == pytest.approx(diff / se)
  # The paired bootstrap and DeLong agree on these 432 patients.
  _, blo, bhi = metrics.auc_difference_ci(y, risk, other, n_bootstrap=1000)
  assert blo == pytest.approx(lo, abs=0.02) and bhi == pytest.approx(hi, abs=0.02)


def test_delong_difference_matches_mlstatkit(rossi):
  """An implementation nobody here wrote (MLstatkit's Delong_test, aligned with R pROC's
  roc.test): the same z (its sign is AUC_B - AUC_A) and P, on tied and untied scores."""
  from MLstatkit import Delong_test

  df, risk = rossi
  y = df['arrest'].to_numpy()
  for a, b in ((risk, -df['age'].to_numpy(float)), (df['prio'].to_numpy(float), risk)):
    z_ref, p_ref, auc_a, auc_b = Delong_test(y, a, b, return_ci=False, return_auc=True)
    diff, _, _, z, p = metrics.delong_difference(y, a, b)
    assert diff == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert z == pytest.approx(-z_ref, rel=1e-9) and p == pytest.approx(p_ref, rel=1e-9)
  y, score = hanley_mcneil_data()
  z_ref, p_ref = Delong_test(y, score, -score, return_ci=False, return_auc=False)
  _, _, _, z, p = metrics.delong_difference(y, score, -score)
  assert z == pytest.approx(-z_ref, rel=1e-9) and p == pytest.approx(p_ref, rel=1e-9)
