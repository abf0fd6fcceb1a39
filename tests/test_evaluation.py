"""Evaluation from predictions.parquet files: thresholds fixed on training, TNM, bad input."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from lifelines import CoxPHFitter
from lifelines.statistics import logrank_test as lifelines_logrank
from lifelines.utils import concordance_index as lifelines_c
from sklearn.metrics import roc_auc_score

from feature_store import store as store_lib
from moemil_jax import evaluation, metrics

# Noise added to the latent truth for each model's scores: MoEMIL is the sharpest.
MODEL_NOISE = {'moemil': 0.5, 'dlr': 1.0, 'pathomics': 1.5}


def make_cohort(n: int = 240, seed: int = 0) -> pd.DataFrame:
  """Clinical table with a planted latent signal driving response, OS and stage."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=n)
  center = np.where(rng.random(n) < 0.35, 'B', 'A')
  response = (rng.random(n) < 1 / (1 + np.exp(-1.5 * z))).astype(float)
  response[rng.random(n) < 0.05] = np.nan
  event_time = rng.exponential(60 * np.exp(-0.8 * z))
  censor_time = rng.uniform(20, 100, n)
  t_stage = np.clip(np.round(2.5 + 0.7 * z + rng.normal(0, 0.8, n)), 1, 4).astype(int)
  n_stage = np.clip(np.round(1.5 + 0.7 * z + rng.normal(0, 0.8, n)), 0, 3).astype(int)
  overall = np.where(
    (t_stage == 4) | (n_stage == 3),
    np.where(n_stage == 3, 'IVB', 'IVA'),
    np.where((t_stage == 3) | (n_stage == 2), 'III', 'II'),
  )
  return pd.DataFrame(
    {
      'patient_id': [f'P{i:03d}' for i in range(n)],
      'center': center,
      'age': rng.integers(20, 70, n).astype(float),
      'sex': rng.choice(['M', 'F'], n),
      'ebv_dna': rng.lognormal(6, 2, n),
      't_stage': t_stage,
      'n_stage': n_stage,
      'overall_stage': overall,
      'ic_response': pd.array(response, dtype='Float64').astype('Int64'),
      'os_months': np.minimum(event_time, censor_time).round(1),
      'os_event': (event_time <= censor_time).astype(int),
      '_latent': z,
    }
  )


def assign_splits(cohort: pd.DataFrame, seed: int = 0) -> pd.Series:
  rng = np.random.default_rng(seed + 1)
  split = np.where(
    cohort['center'] == 'B', 'test', np.where(rng.random(len(cohort)) < 0.65, 'train', 'val')
  )
  return pd.Series(split, index=cohort.index)


def write_workdir(
  root: Path, cohort: pd.DataFrame | None = None, seed: int = 0, models=tuple(MODEL_NOISE)
) -> Path:
  """A workdir in the training contract: <model>/predictions.parquet + run.json, and a store."""
  cohort = make_cohort(seed=seed) if cohort is None else cohort
  split = assign_splits(cohort, seed)
  store = root / 'store'
  store_lib.write_clinical(
    store, pa.Table.from_pandas(cohort[list(store_lib.CLINICAL_COLUMNS)], preserve_index=False)
  )
  rng = np.random.default_rng(seed + 2)
  workdir = root / 'workdir'
  for model in models:
    score = cohort['_latent'].to_numpy() + rng.normal(0, MODEL_NOISE[model], len(cohort))
    logit = 1.5 * score
    df = pd.DataFrame(
      {
        'patient_id': cohort['patient_id'],
        'center': cohort['center'],
        'split': split,
        'model': model,
        'response_logit': logit,
        'response_prob': 1 / (1 + np.exp(-logit)),
        'log_risk': 0.8 * score,
        'ic_response': cohort['ic_response'],
        'os_months': cohort['os_months'].astype(float),
        'os_event': cohort['os_event'],
      }
    )
    (workdir / model).mkdir(parents=True, exist_ok=True)
    df.to_parquet(workdir / model / 'predictions.parquet', index=False)
    (workdir / model / 'run.json').write_text(
      json.dumps({'model': model, 'store': str(store.resolve())})
    )
  return workdir


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory):
  workdir = write_workdir(tmp_path_factory.mktemp('eval'))
  return workdir, evaluation.evaluate(workdir, n_bootstrap=200)


def test_models_and_metrics_match_libraries(evaluated):
  workdir, ev = evaluated
  assert ev.models == ['moemil', 'moemil_clinical', 'dlr', 'pathomics', 'tnm', 'tnm_ebv']
  for name in ev.models:
    df = ev.predictions[name]
    r = ev.results['per_model'][name]
    for split in evaluation.SPLITS:
      part = df[df['split'] == split]
      lab = part[part['ic_response'].notna()]
      assert r['response'][split]['auc'] == pytest.approx(
        roc_auc_score(lab['ic_response'].astype(int), lab['response_prob'])
      )
      s = r['survival'][split]
      assert s['c_index'] == pytest.approx(
        lifelines_c(part['os_months'], -part['log_risk'], part['os_event'])
      )
  # The planted signal ranks the models as it should on the test split.
  auc = {m: ev.results['per_model'][m]['response']['test']['auc'] for m in ev.models}
  assert auc['moemil'] > auc['pathomics'] and auc['moemil'] > 0.75
  json.dumps(ev.results)  # JSON-serialisable, NaN-free


def test_cutoffs_fixed_on_validation_and_applied_unchanged(evaluated):
  _, ev = evaluated
  df = ev.predictions['moemil']
  surv = ev.results['per_model']['moemil']['survival']
  cutoff = np.median(df.loc[df['split'] == 'val', 'log_risk'])  # model selection, not training
  assert surv['cutoff'] == pytest.approx(cutoff) and surv['cutoff_fixed_on'] == 'validation'
  assert cutoff != pytest.approx(np.median(df.loc[df['split'] == 'train', 'log_risk']))
  for split in ('val', 'test'):
    part = df[df['split'] == split]
    high = part['log_risk'] > cutoff
    assert (part['high_risk'] == high.astype(int)).all()
    ref = lifelines_logrank(
      part['os_months'][high],
      part['os_months'][~high],
      part['os_event'][high],
      part['os_event'][~high],
    )
    assert surv[split]['logrank_p'] == pytest.approx(ref.p_value)
    cph = CoxPHFitter().fit(
      pd.DataFrame({'t': part['os_months'], 'e': part['os_event'], 'g': high.astype(float)}),
      't',
      'e',
    )
    assert surv[split]['hr'] == pytest.approx(cph.hazard_ratios_['g'], rel=1e-6)
  resp = ev.results['per_model']['moemil']['response']
  val = df[(df['split'] == 'val') & df['ic_response'].notna()]
  assert resp['threshold'] == pytest.approx(
    metrics.youden_threshold(val['ic_response'].astype(int), val['response_prob'])
  )
  assert resp['threshold_fixed_on'] == 'validation'
  test = df[(df['split'] == 'test') & df['ic_response'].notna()]
  called = test['response_prob'] >= resp['threshold']
  assert resp['test']['tp'] == int((called & (test['ic_response'] == 1)).sum())


def test_delong_comparisons_and_tables(evaluated):
  _, ev = evaluated
  for split in evaluation.SPLITS:
    assert set(ev.results['delong'][split]) == {
      'dlr',
      'pathomics',
      'tnm',
      'tnm_ebv',
      'moemil_clinical',
    }
    assert 0 <= ev.results['delong'][split]['pathomics']['p'] <= 1
  table = evaluation.comparison_table(ev)
  assert list(table.index) == [
    'MoEMIL',
    'MoEMIL + clinical (TNM, EBV DNA)',
    'DLR',
    'Pathomics',
    'TNM',
    'TNM + EBV DNA',
  ]
  assert 'AUC External test (95% CI)' in table.columns
  assert 'Log-rank P Validation (model selection)' in table.columns
  text = evaluation.format_comparison(table)
  for name in ('MoEMIL', 'DLR', 'Pathomics', 'TNM', 'C-index', 'Log-rank P', 'External test'):
    assert name in text
  assert evaluation.survival_table(ev, 'test').shape[0] == 6
  assert 'DeLong P vs MoEMIL' in evaluation.response_table(ev, 'val').columns


def test_combined_comparator_is_fitted_on_validation_and_tested(tmp_path):
  """MoEMIL + clinical: fitted on the validation split, in metrics.json with DeLong tests."""
  workdir = write_workdir(tmp_path)
  ev = evaluation.evaluate(workdir, n_bootstrap=50, with_baselines=True)
  assert {'tnm_ebv', 'moemil_clinical'} <= set(ev.models)
  combined = ev.predictions['moemil_clinical']
  assert combined['response_prob'].between(0, 1).all()
  for split in evaluation.SPLITS:
    assert 0 <= ev.results['delong'][split]['moemil_clinical']['p'] <= 1
    assert 0 <= ev.results['delong_combined_vs_clinical'][split]['tnm_ebv']['p'] <= 1
  # Fitted on validation only: changing training patients' outcomes does not move it.
  pred = pd.read_parquet(workdir / 'moemil' / 'predictions.parquet')
  train = pred['split'] == 'train'
  pred.loc[train, 'response_logit'] = -pred.loc[train, 'response_logit']
  pred.loc[train, 'response_prob'] = 1 / (1 + np.exp(-pred.loc[train, 'response_logit']))
  pred.to_parquet(workdir / 'moemil' / 'predictions.parquet', index=False)
  again = evaluation.evaluate(workdir, n_bootstrap=50, with_baselines=True)
  test = combined['split'] == 'test'
  np.testing.assert_allclose(
    again.predictions['moemil_clinical'].loc[test, 'response_prob'],
    combined.loc[test, 'response_prob'],
    rtol=1e-9,
  )
  saved = json.loads(json.dumps(ev.results))
  assert 'moemil_clinical' in saved['per_model'] and 'tnm_ebv' in saved['per_model']


def test_tnm_uses_training_patients_only(tmp_path):
  cohort = make_cohort(seed=1)
  split = assign_splits(cohort, seed=1)
  split_of = pd.Series(split.to_numpy(), index=cohort['patient_id'])
  clinical = cohort.drop(columns='_latent')
  before = evaluation.tnm_predictions(clinical, split_of)
  # Scramble the outcomes of validation and test patients: the TNM fit must not move.
  scrambled = clinical.copy()
  held_out = (split != 'train').to_numpy()
  scrambled.loc[held_out, 'os_months'] = scrambled.loc[held_out, 'os_months'].to_numpy()[::-1]
  scrambled.loc[held_out, 'ic_response'] = 1 - scrambled.loc[held_out, 'ic_response']
  after = evaluation.tnm_predictions(scrambled, split_of)
  np.testing.assert_allclose(before['response_prob'], after['response_prob'])
  np.testing.assert_allclose(before['log_risk'], after['log_risk'])
  # Higher stage means higher predicted risk (the stage signal is planted).
  assert np.corrcoef(before['log_risk'], clinical['t_stage'] + clinical['n_stage'])[0, 1] > 0.5
  bad = clinical.copy()
  bad.loc[3, 'overall_stage'] = 'V'
  with pytest.raises(evaluation.EvaluationError, match='P003'):
    evaluation.tnm_predictions(bad, split_of)


def test_one_class_split_reports_undefined_auc(tmp_path):
  cohort = make_cohort(seed=2)
  split = assign_splits(cohort, seed=2)
  cohort.loc[(split == 'val').to_numpy(), 'ic_response'] = 1
  ev = evaluation.evaluate(write_workdir(tmp_path, cohort, seed=2), n_bootstrap=50)
  val = ev.results['per_model']['moemil']['response']['val']
  assert 'auc' not in val
  assert 'one class' in val['auc_undefined']
  assert ev.results['delong']['val']['dlr']['undefined']
  assert (
    evaluation.comparison_table(ev).loc['MoEMIL', 'AUC Validation (model selection) (95% CI)']
    == 'n/a'
  )
  assert any('one class' in line for line in evaluation.undefined_notes(ev))
  assert 'auc' in ev.results['per_model']['moemil']['response']['test']


def test_nan_predictions_are_refused_naming_patients(tmp_path):
  workdir = write_workdir(tmp_path)
  path = workdir / 'dlr' / 'predictions.parquet'
  df = pd.read_parquet(path)
  df.loc[[5, 7], 'log_risk'] = np.nan
  df.to_parquet(path, index=False)
  with pytest.raises(evaluation.EvaluationError, match=r'dlr.*log_risk.*2 patients: P005, P007'):
    evaluation.evaluate(workdir)


def test_few_events_are_said(tmp_path):
  cohort = make_cohort(seed=3)
  split = assign_splits(cohort, seed=3)
  test_idx = np.flatnonzero((split == 'test').to_numpy())
  cohort.loc[test_idx, 'os_event'] = 0
  cohort.loc[test_idx[:4], 'os_event'] = 1  # 4 events on the external test
  val_idx = np.flatnonzero((split == 'val').to_numpy())
  cohort.loc[val_idx, 'os_event'] = 0  # no events on validation
  ev = evaluation.evaluate(write_workdir(tmp_path, cohort, seed=3), n_bootstrap=50)
  s = ev.results['per_model']['moemil']['survival']
  assert '4 events' in s['test']['logrank_warning'] and s['test']['logrank_p'] is not None
  assert 'no events' in s['val']['logrank_undefined']
  assert 'no events' in s['val']['c_index_undefined']
  assert evaluation.comparison_table(ev).loc['MoEMIL', 'Log-rank P External test'].endswith('*')
  assert 'unreliable' in evaluation.format_comparison(evaluation.comparison_table(ev))


def test_split_disagreement_is_refused(tmp_path):
  workdir = write_workdir(tmp_path)
  path = workdir / 'pathomics' / 'predictions.parquet'
  df = pd.read_parquet(path)
  df.loc[df['split'] == 'train', 'split'] = 'val'
  df.to_parquet(path, index=False)
  with pytest.raises(evaluation.EvaluationError, match='different splits'):
    evaluation.evaluate(workdir)


def test_missing_store_skips_tnm_with_a_note(tmp_path):
  workdir = write_workdir(tmp_path)
  (tmp_path / 'store' / 'clinical.parquet').unlink()
  ev = evaluation.evaluate(workdir, n_bootstrap=20)
  assert 'tnm' not in ev.models
  assert any('TNM comparator skipped' in n for n in ev.results['notes'])


def test_bad_outcome_values_are_refused_naming_patients(tmp_path):
  workdir = write_workdir(tmp_path)
  path = workdir / 'moemil' / 'predictions.parquet'
  df = pd.read_parquet(path)
  df['os_event'] = df['os_event'].astype(int)
  df.loc[11, 'os_event'] = 2
  df.to_parquet(path, index=False)
  with pytest.raises(evaluation.EvaluationError, match=r'os_event not 0 or 1 for P011'):
    evaluation.evaluate(workdir)


def test_oracle_row_from_truth_is_the_ceiling(tmp_path):
  cohort = make_cohort()
  workdir = write_workdir(tmp_path, cohort)
  prob = 1 / (1 + np.exp(-1.5 * cohort['_latent']))
  truth = tmp_path / 'truth.csv'
  pd.DataFrame(
    {
      'patient_id': cohort['patient_id'],
      'latent': cohort['_latent'],
      'response_prob': prob,
      'log_hazard': 0.8 * cohort['_latent'],
    }
  ).to_csv(truth, index=False)
  ev = evaluation.evaluate(workdir, n_bootstrap=50, truth=truth)
  assert ev.models[-1] == 'oracle'
  test = ev.predictions['oracle'].query("split == 'test'")
  lab = test[test['ic_response'].notna()]
  oracle = ev.results['per_model']['oracle']
  assert oracle['response']['test']['auc'] == pytest.approx(
    roc_auc_score(lab['ic_response'].astype(int), lab['response_prob'])
  )
  assert oracle['survival']['test']['c_index'] == pytest.approx(
    lifelines_c(test['os_months'], -test['log_risk'], test['os_event'])
  )
  # The oracle scores are the noise-free truth, so they beat every noisy model on the test split.
  assert (
    oracle['response']['test']['auc']
    >= ev.results['per_model']['moemil']['response']['test']['auc']
  )
  assert 'Oracle (truth)' in evaluation.comparison_table(ev).index

  pd.read_csv(truth).iloc[1:].to_csv(truth, index=False)  # a patient without truth
  with pytest.raises(evaluation.EvaluationError, match='truth.csv has no row for'):
    evaluation.evaluate(workdir, n_bootstrap=50, truth=truth)


def test_comparison_says_how_big_each_split_is(evaluated):
  """One line under the title: patients, labelled patients and deaths per split."""
  _, ev = evaluated
  df = ev.predictions['moemil']
  line = evaluation.format_comparison(evaluation.comparison_table(ev)).splitlines()[1]
  for split in evaluation.SPLITS:
    part = df[df['split'] == split]
    name = evaluation.SPLIT_NAMES[split]
    where = ', center B' if split == 'test' else ''
    labelled, deaths = int(part['ic_response'].notna().sum()), int(part['os_event'].sum())
    assert f'{name} {len(part)}{where} ({labelled} with IC response, {deaths} deaths)' in line


def test_an_empty_split_is_one_warning_line(tmp_path):
  """No validation patients (an ensemble's runs): one line says so, not one per task and test."""
  workdir = write_workdir(tmp_path)
  for path in workdir.glob('*/predictions.parquet'):
    df = pd.read_parquet(path)
    df.loc[df['split'] == 'val', 'split'] = 'train'
    df.to_parquet(path, index=False)
  ev = evaluation.evaluate(workdir, n_bootstrap=50, with_baselines=False)
  notes = evaluation.undefined_notes(ev)
  about_val = [n for n in notes if 'Validation' in n]
  assert about_val == [
    'Validation (model selection): no patients in this split (all models; column left out)'
  ]
  table = evaluation.comparison_table(ev)
  assert not any('Validation' in c for c in table.columns)  # no empty column
  # No out-of-fold or validation predictions: thresholds in-sample, and the results say so.
  assert ev.results['per_model']['moemil']['response']['threshold_warning']


def to_ensemble(workdir: Path, seed: int = 0) -> None:
  """Rewrites the workdir's predictions as an ensemble's: development patients are 'train'
  (in-sample) with noisier out-of-fold predictions and their fold (`oof_fold`)."""
  rng = np.random.default_rng(seed + 5)
  for path in workdir.glob('*/predictions.parquet'):
    df = pd.read_parquet(path)
    dev = (df['split'] != 'test').to_numpy()
    df.loc[dev, 'split'] = 'train'
    noise = rng.normal(0, 1.0, len(df))
    df['oof_response_logit'] = np.where(dev, df['response_logit'] + 0.75 * noise, np.nan)
    df['oof_log_risk'] = np.where(dev, df['log_risk'] + 0.4 * noise, np.nan)
    df['oof_fold'] = np.where(dev, rng.integers(0, 5, len(df)), -1)
    df.to_parquet(path, index=False)


@pytest.fixture(scope='module')
def ensemble_evaluated(tmp_path_factory):
  workdir = write_workdir(tmp_path_factory.mktemp('ens'), models=('moemil',))
  to_ensemble(workdir)
  return workdir, evaluation.evaluate(workdir, n_bootstrap=200)


def test_ensemble_development_column_is_out_of_fold(ensemble_evaluated):
  workdir, ev = ensemble_evaluated
  assert {'tnm', 'tnm_ebv', 'moemil_clinical'} <= set(ev.models)
  table = evaluation.comparison_table(ev)
  assert 'AUC Development (out-of-fold) (95% CI)' in table.columns
  assert 'AUC Training (in-sample) (95% CI)' in table.columns
  assert not any('Validation' in c for c in table.columns)
  assert 'development out-of-fold predictions (every model)' in table.attrs['fixed_on']
  for name in ('moemil', 'tnm', 'tnm_ebv', 'moemil_clinical'):
    r = ev.results['per_model'][name]
    assert r['response']['threshold_fixed_on'] == 'out_of_fold'
    assert r['survival']['cutoff_fixed_on'] == 'out_of_fold'
    df = ev.predictions[name]
    oof = df[df['oof_response_logit'].notna()]
    assert len(oof) == (df['split'] == 'train').sum()  # every development patient
    lab = oof[oof['ic_response'].notna()]
    assert r['response']['oof']['auc'] == pytest.approx(
      roc_auc_score(lab['ic_response'].astype(int), lab['oof_response_logit'])
    )
    # The threshold is the Youden point of those out-of-fold predictions.
    prob = 1 / (1 + np.exp(-lab['oof_response_logit']))
    assert r['response']['threshold'] == pytest.approx(
      metrics.youden_threshold(lab['ic_response'].astype(int).to_numpy(), prob.to_numpy())
    )
  # A baseline's out-of-fold prediction for fold 0 is the baseline refitted without fold 0.
  from moemil_jax import baselines

  clinical = pd.read_parquet(workdir.parent / 'store' / 'clinical.parquet')
  clinical['patient_id'] = clinical['patient_id'].astype(str)
  primary = ev.predictions['moemil']
  split_of = primary.set_index('patient_id')['split'].copy()
  fold0 = primary.loc[primary['oof_fold'] == 0, 'patient_id']
  split_of[fold0] = 'val'
  refit = baselines.tnm_ebv_predictions(clinical, split_of).set_index('patient_id')
  got = ev.predictions['tnm_ebv'].set_index('patient_id')
  np.testing.assert_allclose(
    got.loc[fold0, 'oof_response_logit'], refit.loc[fold0, 'response_logit'], rtol=1e-6
  )
  assert not np.allclose(got.loc[fold0, 'oof_response_logit'], got.loc[fold0, 'response_logit'])
  # The per-column tables say where each threshold and cutoff was fixed.
  for split in ('oof', 'test'):
    assert set(evaluation.response_table(ev, split)['Threshold fixed on']) == {
      'development out-of-fold predictions'
    }
    assert set(evaluation.survival_table(ev, split)['Cutoff fixed on']) == {
      'development out-of-fold predictions'
    }


def test_combat_runs_are_flagged_transductive(tmp_path):
  workdir = write_workdir(tmp_path, models=('moemil',))
  run = workdir / 'moemil' / 'run.json'
  info = json.loads(run.read_text())
  info['config'] = {'data': {'harmonise': 'combat'}}
  run.write_text(json.dumps(info))
  ev = evaluation.evaluate(workdir, n_bootstrap=20, with_baselines=False)
  assert any('ComBat' in n and 'transductive' in n for n in evaluation.undefined_notes(ev))


def test_added_value_rows_and_nested_tests(ensemble_evaluated, tmp_path):
  _, ev = ensemble_evaluated
  av = ev.results['added_value']
  first = av['comparisons'][0]
  assert (first['model'], first['comparator']) == ('moemil_clinical', 'tnm_ebv')
  for split in ('oof', 'test'):
    auc = first[split]['auc']
    assert auc['lo'] <= auc['diff'] <= auc['hi'] and 0 <= auc['delong_p'] <= 1
    assert auc['delong_lo'] <= auc['diff'] <= auc['delong_hi']
    c = first[split]['c_index']
    assert c['lo'] <= c['diff'] <= c['hi']
  # MoEMIL's score carries the latent signal the stages only echo: the nested tests see it.
  assert av['lr_test']['response']['p'] < 0.01 and av['lr_test']['survival']['p'] < 0.05
  assert {e['comparator'] for e in av['comparisons'][1:]} <= {'tnm', 'tnm_ebv'}
  text = evaluation.format_comparison(evaluation.comparison_table(ev))
  assert 'Added value' in text and 'Likelihood-ratio test' in text
  assert 'MoEMIL + clinical (TNM, EBV DNA) - TNM + EBV DNA' in text
  from moemil_jax import report

  paths = report.write_report(ev, tmp_path)
  assert 'decision_curve_added_oof' in paths and 'decision_curve_added_test' in paths
  assert 'Added value over TNM + EBV DNA' in paths['report.html'].read_text()
  assert (tmp_path / 'added_value.csv').exists()
