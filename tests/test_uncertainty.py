"""Survival probabilities (Breslow), conformal response sets, spreads and the patient card."""

import numpy as np
import pandas as pd
import pytest

from moemil_jax import conformal, survival_probability


@pytest.fixture(scope='module')
def cox_data():
  rng = np.random.default_rng(0)
  n = 300
  x = rng.normal(size=(n, 2))
  hazard = np.exp(0.8 * x[:, 0] - 0.5 * x[:, 1])
  death = rng.exponential(30.0 / hazard)
  censor = rng.uniform(5, 90, n)
  t = np.round(np.minimum(death, censor), 1)  # rounded: tied times, as in real follow-up
  e = (death <= censor).astype(int)
  return pd.DataFrame({'x0': x[:, 0] + 2.0, 'x1': x[:, 1] - 1.0, 't': t, 'e': e})


def test_breslow_matches_lifelines(cox_data):
  from lifelines import CoxPHFitter

  cph = CoxPHFitter().fit(cox_data, 't', 'e')
  beta = cph.params_[['x0', 'x1']].to_numpy()
  lp = cox_data[['x0', 'x1']].to_numpy() @ beta
  # lifelines' baseline is for covariates at their means: exp(lp - mean(X) beta).
  centred = lp - cox_data[['x0', 'x1']].mean().to_numpy() @ beta
  base = survival_probability.fit(cox_data.t, cox_data.e, centred)
  ref = cph.baseline_cumulative_hazard_['baseline cumulative hazard']
  np.testing.assert_allclose(
    base.cumulative_hazard(ref.index.to_numpy()), ref.to_numpy(), rtol=1e-8
  )
  # The probability of one patient equals lifelines' predicted survival function.
  times = np.array([10.0, 30.0, 60.0])
  ours = base.survival(centred[:3], times)
  theirs = cph.predict_survival_function(cox_data.iloc[:3], times=times).to_numpy().T
  np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_kaplan_meier_matches_lifelines(cox_data):
  from lifelines import KaplanMeierFitter

  base = survival_probability.fit(cox_data.t, cox_data.e, np.zeros(len(cox_data)))
  km = KaplanMeierFitter().fit(cox_data.t, cox_data.e)
  grid = np.array([3.0, 12.0, 36.0, 60.0, cox_data.t.max()])
  np.testing.assert_allclose(base.population(grid), km.survival_function_at_times(grid), rtol=1e-9)
  assert np.isnan(base.population([cox_data.t.max() + 1])[0])  # beyond follow-up: unknown


def test_survival_evaluation_against_null(cox_data):
  rng = np.random.default_rng(1)
  frame = cox_data.rename(columns={'t': 'os_months', 'e': 'os_event'})
  lp = 0.8 * cox_data.x0 - 0.5 * cox_data.x1
  frame['log_risk'] = lp - lp.mean()
  frame['split'] = rng.choice(['train', 'test'], len(frame), p=[0.6, 0.4])
  res = survival_probability.evaluate(frame, horizons=(12.0, 36.0))
  test = res['test']
  assert 0.6 < test['calibration_slope'] < 1.6  # the true model
  assert test['ibs'] < test['ibs_null']  # an informative model beats the KM null model
  assert len(test['calibration']['36']['groups']) == 5
  table = survival_probability.summary_table(res)
  assert set(table.split) == {'train', 'test'}


def _synthetic(rng, n):
  """Exchangeable patients: labels drawn from a probability the model only roughly knows."""
  true = 1 / (1 + np.exp(-rng.normal(0, 1.5, n)))
  y = (rng.uniform(size=n) < true).astype(int)
  prob = 1 / (1 + np.exp(-(np.log(true / (1 - true)) + rng.normal(0, 1, n))))
  return prob, y


def test_conformal_matches_crepes():
  crepes = pytest.importorskip('crepes')
  rng = np.random.default_rng(2)
  cal_p, cal_y = _synthetic(rng, 150)
  test_p, _ = _synthetic(rng, 400)
  ours = conformal.Mondrian(cal_p, cal_y)
  cc = crepes.ConformalClassifier().fit(conformal.scores(cal_p, cal_y), bins=cal_y)
  alphas = np.stack([conformal.scores(test_p, 0), conformal.scores(test_p, 1)], 1)
  theirs = np.stack(
    [cc.predict_p(alphas, bins=np.full(len(test_p), c), smoothing=False)[:, c] for c in (0, 1)],
    1,
  )
  np.testing.assert_allclose(ours.p_values(test_p), theirs)
  for c in (0, 1):
    sets = cc.predict_set(alphas, bins=np.full(len(test_p), c), confidence=0.9, smoothing=False)
    np.testing.assert_array_equal(ours.predict_set(test_p, 0.9)[:, c], sets[:, c].astype(bool))
  restored = conformal.Mondrian.from_json(ours.to_json())
  np.testing.assert_array_equal(restored.p_values(test_p), ours.p_values(test_p))


@pytest.mark.parametrize('level', [0.8, 0.9])
def test_conformal_coverage_within_binomial_error(level):
  """Per class, split-conformal coverage lies in [level, level + 1/(n_c + 1)] in expectation:
  the mean over many calibration draws must be inside it up to 3 standard errors."""
  rng = np.random.default_rng(3)
  trials, n_cal, n_test = 300, 120, 40
  cover = {0: [], 1: []}
  bound = {0: [], 1: []}
  for _ in range(trials):
    cal_p, cal_y = _synthetic(rng, n_cal)
    test_p, test_y = _synthetic(rng, n_test)
    sets = conformal.Mondrian(cal_p, cal_y).predict_set(test_p, level)
    covered = sets[np.arange(n_test), test_y]
    for c in (0, 1):
      if (test_y == c).any():
        cover[c].append(covered[test_y == c].mean())
        bound[c].append(1 / ((cal_y == c).sum() + 1))
  for c in (0, 1):
    values = np.array(cover[c])
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert level - 3 * se <= values.mean() <= level + np.mean(bound[c]) + 3 * se, (c, values.mean())


def test_cross_conformal_development_coverage():
  rng = np.random.default_rng(4)
  prob, y = _synthetic(rng, 2000)
  folds = rng.integers(0, 5, len(prob))
  sets = conformal.cross_conformal(prob, y, folds, 0.9)
  summary = conformal.set_summary(sets, y)
  se = np.sqrt(0.9 * 0.1 / len(prob))
  assert abs(summary['coverage'] - 0.9) < 3 * se + 0.01
  assert 1.0 <= summary['mean_set_size'] <= 2.0
  names = conformal.set_names(np.array([[1, 0], [0, 1], [1, 1], [0, 0]], bool))
  assert list(names) == ['non-responder', 'responder', 'uncertain', 'empty']


def test_conformal_refuses_a_class_too_small():
  with pytest.raises(ValueError, match='responders'):
    conformal.Mondrian(np.array([0.2, 0.3, 0.9]), np.array([0, 0, 1]))
