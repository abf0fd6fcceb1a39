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


@pytest.fixture(scope='module')
def scored(cox_data):
  """A predict table of 6 patients from a 3-member 'ensemble', with a fitted bundle entry."""
  from moemil_jax import bundle, uncertainty

  rng = np.random.default_rng(5)
  n = len(cox_data)
  dev = pd.DataFrame(
    {
      'os_months': cox_data.t,
      'os_event': cox_data.e,
      'split': 'train',
      'log_risk': 0.8 * cox_data.x0 - 0.5 * cox_data.x1,
      'ic_response': pd.array(rng.integers(0, 2, n), dtype='Int64'),
      'response_prob': rng.uniform(size=n),
      'center': 'A',
    }
  )
  dev['oof_log_risk'] = dev.log_risk + rng.normal(0, 0.1, n)
  dev['oof_response_logit'] = np.log(dev.response_prob / (1 - dev.response_prob))
  dev['oof_fold'] = rng.integers(0, 3, n)
  meta = {'uncertainty': bundle.uncertainty(dev)}
  assert meta['uncertainty']['survival']['source'] == 'out_of_fold'
  logits = np.array([[-2.0, 0.0, 1.0, 2.0, 0.1, -1.0], [-1.8, 0.1, 1.2, -1.5, 0.0, -1.1]])
  logits = np.vstack([logits, logits[0] + 0.05])
  risks = np.array([[0.0, 1.0, -1.0, 0.5, 0.0, 2.0]] * 3) + np.array([[0.0], [0.1], [-1.5]])
  frame = pd.DataFrame(
    {
      'patient_id': [f'P{i}' for i in range(6)],
      'response_prob': 1 / (1 + np.exp(-logits.mean(0))),
      'log_risk': risks.mean(0),
      'risk_group': 'high',
      'modalities_used': 'wsi+radiomics',
      'warnings': ['', 'no deep MRI', '', '', '', ''],
      'model': 'moemil (3 members)',
    }
  )
  frame['response_class'] = (frame.response_prob >= 0.5).astype(int)
  frame.attrs['threshold'] = 0.5
  return uncertainty.add_columns(frame, meta, logits, risks, uncertainty.Options()), meta


def test_predict_columns_hold_probabilities_sets_and_spreads(scored):
  from moemil_jax import uncertainty

  table, meta = scored
  base = uncertainty.baseline(meta)
  np.testing.assert_allclose(
    table.os_prob_36m, np.exp(-base.cumulative_hazard(36.0) * np.exp(table.log_risk))
  )
  for h in ('12', '36', '60'):
    lo, p, hi = table[f'os_prob_{h}m_lo'], table[f'os_prob_{h}m'], table[f'os_prob_{h}m_hi']
    assert (lo <= hi).all() and ((lo <= p + 1e-12) & (p <= hi + 1e-12)).all()
  assert (table.os_prob_12m >= table.os_prob_60m).all()
  assert set(table.response_set) <= {'responder', 'non-responder', 'uncertain', 'empty'}
  assert (table.response_set_level == 0.9).all()
  # Patient 3: members at logits 2.0 and -1.5 disagree; patient 0 does not. Patient 5's
  # members' log-risks span 1.6 where the hazard is high (OS 36 months 0.2-0.8).
  assert 'members disagree on the response probability' in table.warnings[3]
  assert 'members disagree on the 36-month OS probability' in table.warnings[5]
  assert table.warnings[1].startswith('no deep MRI')
  assert table.warnings[0] == ''
  curves = uncertainty.curves(table)
  assert curves.groupby('patient_id').month.count().nunique() == 1
  assert (curves.os_prob_lo <= curves.os_prob_hi).all()


def test_patient_card_renders(scored, tmp_path):
  import matplotlib.pyplot as plt

  from moemil_jax import patient_card

  table, _ = scored
  explain = tmp_path / 'explain'
  explain.mkdir()
  plt.imsave(explain / 'P0_slide1_attention.png', np.random.default_rng(0).uniform(size=(20, 30)))
  written = patient_card.write_cards(table.iloc[:2], tmp_path / 'cards', explain_dir=explain)
  assert sorted(p.name for p in written) == ['P0.html', 'P0.png', 'P1.html', 'P1.png']
  cards = tmp_path / 'cards'
  with_thumb, without = plt.imread(cards / 'P0.png'), plt.imread(cards / 'P1.png')
  assert with_thumb.shape[0] > without.shape[0] > 300  # the thumbnail row adds height
  page = (tmp_path / 'cards' / 'P1.html').read_text()
  assert 'no deep MRI' in page and 'OS at 36 months' in page and 'data:image/png;base64' in page
  with pytest.raises(ValueError, match='card format'):
    patient_card.write_cards(table, tmp_path / 'x', formats=['pdf'])


def test_report_section_per_split_and_center(cox_data, tmp_path):
  """The evaluation hook: development coverage cross-conformal, the test center split-conformal."""
  import types

  from moemil_jax import uncertainty_report

  rng = np.random.default_rng(6)
  n = len(cox_data)
  prob, y = _synthetic(rng, n)
  lp = 0.8 * cox_data.x0 - 0.5 * cox_data.x1
  test = rng.uniform(size=n) < 0.3
  frame = pd.DataFrame(
    {
      'patient_id': [f'P{i}' for i in range(n)],
      'center': np.where(test, 'B', 'A'),
      'split': np.where(test, 'test', 'train'),
      'response_prob': prob,
      'ic_response': pd.array(y, dtype='Int64'),
      'log_risk': lp - lp.mean(),
      'os_months': cox_data.t,
      'os_event': cox_data.e,
    }
  )
  frame['oof_response_logit'] = np.where(test, np.nan, np.log(prob / (1 - prob)))
  frame['oof_log_risk'] = np.where(test, np.nan, frame.log_risk)
  frame['oof_fold'] = np.where(test, -1, rng.integers(0, 5, n))
  (tmp_path / 'report.html').write_text('<html><body><h1>r</h1>\n</body></html>')
  ev = types.SimpleNamespace(results={'primary': 'moemil'}, predictions={'moemil': frame})
  paths = uncertainty_report.write(ev, tmp_path)
  res = __import__('json').loads(paths['uncertainty.json'].read_text())
  sets = res['conformal']
  assert sets['per_split']['train']['method'] == 'cross-conformal'
  assert sets['per_split']['test']['method'] == 'split-conformal'
  assert set(sets['per_center']) == {'A (train)', 'B (test)'}
  assert 0.8 < sets['per_split']['train']['coverage'] < 1.0
  assert res['survival']['baseline_source'] == 'out_of_fold'
  assert res['survival']['test']['ibs'] < res['survival']['test']['ibs_null']
  page = (tmp_path / 'report.html').read_text()
  assert page.count('<!-- uncertainty -->') == 1 and 'os_calibration' not in page
  assert (tmp_path / 'figures' / 'os_calibration_test.png').exists()
  uncertainty_report.write(ev, tmp_path)  # rerun: the section is replaced, not added
  assert (tmp_path / 'report.html').read_text().count('<!-- uncertainty -->') == 1


def test_development_coverage_without_folds_is_leave_one_out():
  rng = np.random.default_rng(7)
  prob, y = _synthetic(rng, 200)
  frame = pd.DataFrame(
    {
      'center': 'A',
      'split': 'train',
      'response_prob': prob,
      'ic_response': pd.array(y, dtype='Int64'),
      'oof_response_logit': np.log(prob / (1 - prob)),
    }
  )
  res = conformal.evaluate(frame)['per_split']['train']
  assert res['method'] == 'leave-one-out conformal'
  loo = conformal.cross_conformal(prob, y, np.arange(200))
  assert res['coverage'] == conformal.set_summary(loo, y)['coverage']
