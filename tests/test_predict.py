"""Scoring new patients from a model bundle, without the training store."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from feature_store import synthetic, synthetic_store
from moemil_jax import bundle, predict, train
from moemil_jax.configs import test as test_config

pytestmark = pytest.mark.slow  # trains two models


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two short runs (seeds 0 and 1) on one store; the store is then moved away."""
  root = tmp_path_factory.mktemp('predict')
  knobs = synthetic.Knobs(response_strength=6.0, wsi_signal=0.95, mri_signal=0.95)
  store = synthetic_store.make_store(
    root / 'store', patients=40, seed=5, knobs=knobs, median_patches=30, max_patches=100
  )
  workdirs = []
  for seed in (0, 1):
    c = test_config.get_config()
    c.store = str(store)
    c.seed = seed
    c.train.epochs = 3
    train.train_and_evaluate(c, root / f'run{seed}')
    workdirs.append(root / f'run{seed}')
  moved = root / 'moved_store'
  shutil.move(store, moved)  # nothing of the training store is needed any more
  return workdirs, moved


def test_bundle_reproduces_the_test_predictions_without_the_training_store(runs):
  (run, _), store = runs
  expected = pd.read_parquet(run / 'predictions.parquet')
  test = expected[expected.split == 'test']
  got = predict.load_bundle(run).predict(store, patients=list(test.patient_id))
  assert list(got.patient_id) == list(test.patient_id)
  for col in ['response_prob', 'log_risk'] + [c for c in test if c.startswith('gate_')]:
    np.testing.assert_allclose(got[col], test[col], rtol=1e-5, atol=1e-5, err_msg=col)
  points = json.loads((run / 'bundle' / 'bundle.json').read_text())['operating_points']
  assert points['threshold_fixed_on'] == 'validation' and points['cutoff_fixed_on'] == 'validation'
  assert (got.response_class == (got.response_prob >= points['threshold'])).all()
  assert set(got.risk_group) <= {'high', 'low'}
  assert (got.risk_group.eq('high') == (got.log_risk > points['cutoff'])).all()


def test_one_patient_alone_scores_as_in_a_batch(runs):
  (run, _), store = runs
  model = predict.load_bundle(run)
  everyone = model.predict(store)
  for pid in everyone.patient_id[[0, 7, 19]]:
    alone = model.predict(store, patients=[pid])
    row = everyone[everyone.patient_id == pid]
    np.testing.assert_allclose(alone.response_prob, row.response_prob, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone.log_risk, row.log_risk, rtol=1e-5, atol=1e-6)


def test_missing_modalities_are_named_in_the_warnings(runs):
  (run, _), store = runs
  got = predict.load_bundle(run).predict(store)
  clinical = pd.read_parquet(store / 'clinical.parquet')
  no_wsi = set(clinical.patient_id[~clinical.has_wsi])
  assert no_wsi, 'the synthetic store should have patients without slides'
  for row in got.itertuples():
    assert ('no WSI' in row.warnings) == (row.patient_id in no_wsi)
    assert ('wsi' in row.modalities_used.split('+')) == (row.patient_id not in no_wsi)


def test_ensemble_of_two_runs_is_their_mean(runs):
  workdirs, store = runs
  models = [predict.load_bundle(w) for w in workdirs]
  both = predict.predict_ensemble(models, store)
  one, two = (m.predict(store) for m in models)
  logit = np.log(both.response_prob / (1 - both.response_prob))
  mean_logit = (
    np.log(one.response_prob / (1 - one.response_prob))
    + np.log(two.response_prob / (1 - two.response_prob))
  ) / 2
  np.testing.assert_allclose(logit, mean_logit, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(both.log_risk, (one.log_risk + two.log_risk) / 2, atol=1e-6)
  assert both.model.iloc[0].startswith('ensemble of 2 runs')


def test_store_made_otherwise_is_refused_in_one_line(runs, tmp_path):
  (run, _), store = runs
  other = shutil.copytree(store, tmp_path / 'other')
  info = json.loads((other / 'STORE.json').read_text())
  info['encoder']['weights'] = 'uni2-h'
  (other / 'STORE.json').write_text(json.dumps(info))
  with pytest.raises(bundle.BundleError) as err:
    predict.load_bundle(run).predict(other)
  message = str(err.value)
  assert '\n' not in message and "encoder.weights: 'synthetic' vs 'uni2-h'" in message


def test_bundle_holds_no_pickle(runs):
  (run, _), _ = runs
  files = [p for p in (run / 'bundle').rglob('*') if p.is_file()]
  assert {p.suffix for p in files} == {'.json', '.parquet'}
  for p in files:
    assert b'\x80\x04\x95' not in p.read_bytes() and b'\x80\x05\x95' not in p.read_bytes()


def test_command_line_writes_one_row_per_patient_and_refuses_in_one_line(runs, tmp_path):
  import subprocess
  import sys
  from pathlib import Path

  (run, other_run), store = runs
  root = Path(__file__).resolve().parents[1]
  out = tmp_path / 'pred.csv'
  args = [sys.executable, '-m', 'launch.predict', f'--model={run}', f'--model={other_run}']
  extra = [
    f'--cards={tmp_path / "cards"}',
    f'--curves={tmp_path / "curves.csv"}',
    '--horizons=6,12',
  ]
  done = subprocess.run(
    [*args, f'--store={store}', f'--out={out}', *extra], cwd=root, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-2000:]
  table = pd.read_csv(out)
  clinical = pd.read_parquet(store / 'clinical.parquet')
  assert list(table.patient_id) == list(clinical.patient_id)
  assert {'response_prob', 'response_class', 'log_risk', 'risk_group', 'warnings'} <= set(table)
  # Uncertainty (docs/uncertainty.md): single runs trained on a split, so their spread is
  # the two runs'; OS probabilities from the first run's training-split Breslow baseline.
  assert {'os_prob_6m', 'os_prob_12m_lo', 'response_prob_lo', 'response_set'} <= set(table)
  assert (table.response_prob_lo <= table.response_prob_hi).all()
  assert table.os_prob_12m.between(0, 1).all() and (table.os_prob_6m >= table.os_prob_12m).all()
  assert len(list((tmp_path / 'cards').glob('*.png'))) == len(table)
  assert pd.read_csv(tmp_path / 'curves.csv').patient_id.nunique() == len(table)
  assert 'ensemble of 2 runs' in done.stdout
  bad = subprocess.run(
    [*args, f'--store={tmp_path}', f'--out={out}'], cwd=root, capture_output=True, text=True
  )
  errors = [line for line in bad.stderr.splitlines() if 'error:' in line]
  assert bad.returncode == 2 and len(errors) == 1 and 'Traceback' not in bad.stderr
  assert 'STORE.json' in errors[0]
