"""Baselines: the predictions format, training patients only, agreement with the libraries."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index as lifelines_c
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from feature_store import store as store_lib
from feature_store import synthetic_store
from moemil_jax import baselines, evaluation, preprocess, splits, store_reader

# Seed 4: radiomics reach an external-test AUC of 0.80 (seeds 0-5 give 0.60-0.89 with 34 test
# patients). Slides of 32 patches carry too little signal for mean pooling; nothing is asserted
# about the WSI baseline's accuracy.
STORE_SEED = 4
LINEAR = ('radiomics_linear', 'wsi_meanpool')


@pytest.fixture(scope='module')
def fitted(tmp_path_factory):
  """(store, cohort, split_of, {name: predictions}) on a 120-patient synthetic store."""
  store = synthetic_store.make_store(
    tmp_path_factory.mktemp('baselines') / 'store',
    patients=120,
    seed=STORE_SEED,
    median_patches=32,
  )
  cohort = store_reader.load_store(store)
  split_of = pd.Series(splits.assign_splits(cohort), index=cohort.patient_id)
  notes = []
  out = baselines.baseline_predictions(store, split_of, notes=notes)
  assert not notes
  return store, cohort, split_of, out


def _rewrite_outcomes(src, dst, change):
  """A copy of store `src` at `dst` whose clinical table went through `change(frame)`."""
  shutil.copytree(src, dst)
  frame = pd.read_parquet(dst / store_lib.CLINICAL)
  store_lib.write_clinical(dst, store_lib.clinical_table(change(frame)))
  return dst


def _max_change(a, b):
  return max(
    float(np.abs(a[c].to_numpy(float) - b[c].to_numpy(float)).max())
    for c in ('response_logit', 'response_prob', 'log_risk')
  )


def test_every_baseline_covers_every_patient_in_the_predictions_format(fitted):
  _, cohort, split_of, out = fitted
  assert list(out) == list(baselines.ALL_BASELINES)
  for name, df in out.items():
    evaluation.check_predictions(df, name)
    assert list(df.columns) == list(evaluation.PREDICTION_COLUMNS)
    assert (df['model'] == name).all()
    assert df['patient_id'].tolist() == cohort.patient_id.tolist()
    assert (df['split'].to_numpy() == split_of.loc[df['patient_id']].to_numpy()).all()
  # Patients without the modality get the training-mean prediction: all the same score.
  for name, has in (
    ('radiomics_linear', cohort.has_radiomics),
    ('wsi_meanpool', cohort.patch_count > 0),
  ):
    assert 0 < (~has).sum() and out[name].loc[~has, 'log_risk'].nunique() == 1


def test_fitted_on_training_patients_only(fitted, tmp_path):
  store, cohort, split_of, before = fitted
  held_out = split_of.loc[cohort.patient_id].ne('train').to_numpy()

  def scramble_held_out(frame):
    frame.loc[held_out, 'ic_response'] = 1 - frame.loc[held_out, 'ic_response']
    frame.loc[held_out, 'os_months'] = frame.loc[held_out, 'os_months'].to_numpy()[::-1] + 1
    frame.loc[held_out, 'os_event'] = 1 - frame.loc[held_out, 'os_event']
    return frame

  def change_one_training_patient(frame):
    i = int(np.flatnonzero(~held_out & frame['ic_response'].notna().to_numpy())[0])
    frame.loc[i, 'ic_response'] = 1 - frame.loc[i, 'ic_response']
    frame.loc[i, 'os_months'] = frame['os_months'].max() + 10
    frame.loc[i, 'os_event'] = 1 - frame.loc[i, 'os_event']
    return frame

  same = _rewrite_outcomes(store, tmp_path / 'held_out', scramble_held_out)
  after = baselines.baseline_predictions(same, split_of)
  moved = _rewrite_outcomes(store, tmp_path / 'train', change_one_training_patient)
  changed = baselines.baseline_predictions(moved, split_of)
  for name in baselines.ALL_BASELINES:
    assert _max_change(before[name], after[name]) <= 1e-9, name
    assert not after[name]['ic_response'].equals(before[name]['ic_response'])  # outcomes moved
    assert _max_change(before[name], changed[name]) > 1e-6, name


def test_radiomics_logistic_matches_sklearn_and_finds_the_signal(fitted):
  _, cohort, split_of, out = fitted
  df = out['radiomics_linear']
  train = split_of.loc[cohort.patient_id].eq('train').to_numpy()
  sel = preprocess.fit_radiomics(
    cohort.radiomics,
    train,
    cohort.response,
    corr_threshold=0.9,
    lasso=False,
    seed=0,
    transform='zscore',
  )
  x = sel.transform(cohort.radiomics).astype(np.float64)
  x[~cohort.has_radiomics] = 0.0
  rows = train & cohort.has_radiomics & ~np.isnan(cohort.response)
  C = df.attrs['fit']['C']
  assert C in baselines.LOGISTIC_CS
  direct = LogisticRegression(C=C, solver='newton-cg', tol=1e-12, max_iter=1000)
  direct.fit(x[rows], cohort.response[rows].astype(int))
  np.testing.assert_allclose(df['response_logit'], direct.decision_function(x), atol=1e-6)
  test = df[(df['split'] == 'test') & df['ic_response'].notna()]
  auc = roc_auc_score(test['ic_response'].astype(int), test['response_prob'])
  assert auc > 0.65, auc  # 0.80 measured


def test_cox_training_c_index_matches_lifelines(fitted):
  _, cohort, _, out = fitted
  ev = evaluation.evaluate_predictions(out, n_bootstrap=20)
  for name in LINEAR + ('tnm', 'tnm_ebv'):
    df = out[name]
    train = df[(df['split'] == 'train') & df['os_months'].notna()]
    expected = lifelines_c(train['os_months'], -train['log_risk'], train['os_event'])
    assert ev.results['per_model'][name]['survival']['train']['c_index'] == pytest.approx(
      expected, abs=1e-12
    )
  for name, has in (
    ('radiomics_linear', cohort.has_radiomics),
    ('wsi_meanpool', cohort.patch_count > 0),
  ):
    df = out[name]
    fit_rows = (df['split'] == 'train').to_numpy() & has
    expected = lifelines_c(
      df['os_months'][fit_rows], -df['log_risk'][fit_rows], df['os_event'][fit_rows]
    )
    assert df.attrs['fit']['train_c_index'] == pytest.approx(expected, abs=1e-12)
    assert df.attrs['fit']['cox_penalizer'] in baselines.COX_PENALIZERS


@pytest.mark.parametrize('penalizer', [10.0, 0.1, 0.003])
def test_ridge_cox_matches_lifelines(penalizer):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(150, 12)) * rng.uniform(0.5, 3.0, 12) + 1.0
  t = rng.exponential(np.exp(-x[:, 0] + 0.5 * x[:, 1]))  # continuous: no tied times
  e = (rng.random(150) < 0.6).astype(float)
  cols = [f'x{j}' for j in range(12)]
  frame = pd.DataFrame(x, columns=cols).assign(t=t, e=e)
  # lifelines stops at a step of 1e-7 by default; tightened, both reach the same optimum.
  ref = CoxPHFitter(penalizer=penalizer).fit(frame, 't', 'e', fit_options={'precision': 1e-10})
  ours = baselines.RidgeCox.fit(x, t, e, penalizer)
  np.testing.assert_allclose(ours.coef / ours.std, ref.params_[cols].to_numpy(), atol=1e-8)
  np.testing.assert_allclose(
    ours.predict(x), ref.predict_log_partial_hazard(frame[cols]).to_numpy(), atol=1e-8
  )


def _fake_workdir(root, store, split_of):
  """A workdir whose one model ('moemil') predicts the truth plus noise, in the store's splits."""
  clinical = pd.read_parquet(store / store_lib.CLINICAL)
  truth = synthetic_store.read_truth(store).set_index('patient_id').loc[clinical['patient_id']]
  rng = np.random.default_rng(0)
  logit = np.log(truth['response_prob'].clip(1e-6, 1 - 1e-6).to_numpy())
  logit -= np.log1p(-truth['response_prob'].clip(1e-6, 1 - 1e-6).to_numpy())
  logit += rng.normal(0, 1, len(logit))
  df = pd.DataFrame(
    {
      'patient_id': clinical['patient_id'],
      'center': clinical['center'],
      'split': split_of.loc[clinical['patient_id']].to_numpy(),
      'model': 'moemil',
      'response_logit': logit,
      'response_prob': 1 / (1 + np.exp(-logit)),
      'log_risk': truth['log_hazard'].to_numpy() + rng.normal(0, 0.5, len(logit)),
      'ic_response': clinical['ic_response'],
      'os_months': clinical['os_months'],
      'os_event': clinical['os_event'],
    }
  )
  (root / 'moemil').mkdir(parents=True)
  df.to_parquet(root / 'moemil' / 'predictions.parquet', index=False)
  (root / 'moemil' / 'run.json').write_text(json.dumps({'model': 'moemil', 'store': str(store)}))
  return root


def test_evaluate_adds_the_baselines_to_the_comparison(fitted, tmp_path):
  store, _, split_of, out = fitted
  workdir = _fake_workdir(tmp_path / 'workdir', store, split_of)
  ev = evaluation.evaluate(workdir, n_bootstrap=20, truth=store / 'truth.csv')
  table = evaluation.comparison_table(ev)
  assert list(table.index) == [
    'MoEMIL',
    'MoEMIL + clinical (TNM, EBV DNA)',
    'TNM',
    'TNM + EBV DNA',
    'Radiomics (L2 logistic / Cox)',
    'WSI mean-pool (L2 logistic / Cox)',
    'WSI prototypes (L2 logistic / Cox)',
    'Key-patch oracle (L2 on the true key patches)',
    'Ceiling, slides alone',
    'Ceiling, MRI alone',
    'Ceiling (what the views allow)',
    'Oracle (truth)',
  ]
  assert not ev.results['notes']
  assert set(ev.results['delong']['test']) == set(baselines.ALL_BASELINES) | {
    'oracle',
    'ceiling',
    'ceiling_wsi',
    'ceiling_mri',
    'key_patch_oracle',
    baselines.COMBINED,
  }
  for name in baselines.ALL_BASELINES:  # the same frames as baseline_predictions gives
    np.testing.assert_array_equal(ev.predictions[name]['log_risk'], out[name]['log_risk'])
  assert table.loc['Radiomics (L2 logistic / Cox)', 'AUC External test (95% CI)'] != 'n/a'
  ev = evaluation.evaluate(workdir, n_bootstrap=20, with_baselines=False)
  assert ev.models == ['moemil', 'tnm']


def test_unfittable_baselines_are_skipped_with_notes(fitted, tmp_path):
  store, cohort, split_of, _ = fitted
  no_mri = tmp_path / 'no_radiomics'
  shutil.copytree(store, no_mri)
  (no_mri / store_lib.RADIOMICS).unlink()
  notes = []
  out = baselines.baseline_predictions(no_mri, split_of, notes=notes)
  assert set(out) == {'tnm', 'tnm_ebv', 'wsi_meanpool', 'wsi_prototypes'}
  assert notes == ['Radiomics baseline skipped: the store has no radiomics']

  train = split_of.loc[cohort.patient_id].eq('train').to_numpy()

  def one_class(frame):
    frame.loc[train, 'ic_response'] = 1
    return frame

  workdir = _fake_workdir(
    tmp_path / 'workdir', _rewrite_outcomes(store, tmp_path / 'one_class', one_class), split_of
  )
  ev = evaluation.evaluate(workdir, n_bootstrap=20)
  # The combined comparator is fitted on the validation split, which has both classes.
  assert ev.models == ['moemil', 'moemil_clinical']
  assert len(ev.results['notes']) == 5  # the four image and clinical baselines, and TNM
  assert all('skipped' in n and 'one response class' in n for n in ev.results['notes'])
  assert ev.results['notes'] == evaluation.undefined_notes(ev)[:5]


def test_a_choice_at_the_weak_end_of_the_grid_is_named(fitted, monkeypatch, caplog):
  """A CV choice at the weakest penalty is a truncated search: one warning names it."""
  store, _, split_of, _ = fitted
  monkeypatch.setattr(baselines, 'LOGISTIC_CS', (1e-3,))
  monkeypatch.setattr(baselines, 'COX_PENALIZERS', (1.0,))
  with caplog.at_level('WARNING'):
    baselines.baseline_predictions(store, split_of)
  weak = [r.getMessage() for r in caplog.records if 'weakest penalty' in r.getMessage()]
  assert any(m.startswith('radiomics_linear:') and 'C=0.001' in m for m in weak), weak
  assert any(m.startswith('radiomics_linear:') and 'Cox penalizer=1' in m for m in weak), weak


def test_the_strong_ends_of_the_grids_have_converged(fitted):
  """At the strongest penalties the scores' ranking no longer moves (the coefficients tend to
  the score vector at zero), so a CV choice there is not a truncated search."""
  from scipy.stats import spearmanr

  _, cohort, split_of, _ = fitted
  train = split_of.loc[cohort.patient_id].eq('train').to_numpy()
  rows = train & cohort.has_radiomics & ~np.isnan(cohort.response)
  x = np.nan_to_num(cohort.radiomics.to_numpy(float)[rows])
  x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
  y, t, e = cohort.response[rows], cohort.os_months[rows], cohort.os_event[rows]
  logit = {
    C: baselines.logistic_fit(x, y, C).decision_function(x)
    for C in (baselines.LOGISTIC_CS[0] / 100, baselines.LOGISTIC_CS[0])
  }
  risk = {
    p: baselines.RidgeCox.fit(x, t, e, p).predict(x)
    for p in (baselines.COX_PENALIZERS[0] * 100, baselines.COX_PENALIZERS[0])
  }
  for scores in (logit, risk):
    limit, end = scores.values()
    assert spearmanr(limit, end).statistic > 0.9999


def test_radiomics_baseline_sees_the_deep_models_columns(fitted):
  """radiomics_top_k and the harmonisation of the primary run apply to the baseline too."""
  _, cohort, split_of, _ = fitted
  train = split_of.loc[cohort.patient_id].eq('train').to_numpy()
  dc = {'radiomics_top_k': 5, 'radiomics_transform': 'zscore'}
  x, _ = baselines.radiomics_matrix(
    cohort.radiomics,
    train,
    cohort.response,
    data_config=dc,
    os_months=cohort.os_months,
    os_event=cohort.os_event,
  )
  deep = preprocess.fit_radiomics(
    cohort.radiomics,
    train,
    cohort.response,
    lasso=False,
    top_k=5,
    os_months=cohort.os_months,
    os_event=cohort.os_event,
  )
  assert x.shape[1] == 5
  has = cohort.radiomics.notna().any(axis=1).to_numpy()
  np.testing.assert_allclose(x[has], np.asarray(deep.transform(cohort.radiomics))[has])
  # per_center: the baseline's radiomics are z-scored within each center, as the deep model's.
  rad = baselines.harmonised_radiomics(cohort, {'harmonise': 'per_center'})
  for center in ('A', 'B'):
    part = rad[cohort.center == center].dropna(axis=1, how='all')
    assert np.allclose(part.mean().dropna(), 0, atol=1e-8)
  assert baselines.harmonised_radiomics(cohort, {}) is cohort.radiomics
