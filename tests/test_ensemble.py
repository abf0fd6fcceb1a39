"""`launch.train --ensemble=K`: K fold members in one program, predicting with their mean;
killed and resumed, it ends as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from feature_store import synthetic, synthetic_store
from moemil_jax import metrics, train, trainer
from moemil_jax.configs import test as test_config

pytestmark = pytest.mark.slow  # trains a 3-member ensemble, then kills and resumes one

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  knobs = synthetic.Knobs(response_strength=6.0, wsi_signal=0.95, mri_signal=0.95)
  store = synthetic_store.make_store(
    tmp_path_factory.mktemp('store'),
    patients=60,
    seed=3,
    knobs=knobs,
    median_patches=32,
    max_patches=100,
  )
  c = test_config.get_config()
  c.store = str(store)
  c.train.epochs = 4
  c.train.ensemble = 3
  workdir = tmp_path_factory.mktemp('ensemble')
  info = train.train_and_evaluate(c, workdir)
  return c, workdir, info


def test_prediction_is_the_mean_of_the_members(run):
  config, workdir, info = run
  result = info['result']
  frame = pd.read_parquet(workdir / 'predictions.parquet')
  assert len(result.members) == 3 and result.logits.shape == (3, len(frame))
  assert {m.learning_rate for m in result.members} == {config.train.learning_rate}
  np.testing.assert_allclose(frame.response_logit, result.logits.mean(0), rtol=1e-6, atol=1e-6)
  medians = [np.median(result.log_risk[k, result.splits[k] == 'train']) for k in range(3)]
  mean_risk = (result.log_risk - np.array(medians)[:, None]).mean(0)
  np.testing.assert_allclose(frame.log_risk, mean_risk, rtol=1e-6, atol=1e-6)
  # Members differ (each trained on other folds), so the mean is not any one of them.
  assert np.abs(result.logits[0] - result.logits[1]).max() > 1e-3


def test_members_cover_the_development_center_once(run):
  config, workdir, info = run
  result = info['result']
  frame = pd.read_parquet(workdir / 'predictions.parquet')
  dev = (frame.center != 'B').to_numpy()
  val = result.splits == 'val'
  assert (val.sum(0)[dev] == 1).all() and not val[:, ~dev].any()
  assert set(frame.split) == {'train', 'test'}
  assert frame.split.eq('test').to_numpy().tolist() == (~dev).tolist()
  # Out-of-fold columns hold each development patient's prediction by the member holding it out.
  k = val.argmax(0)
  np.testing.assert_allclose(
    frame.oof_response_logit[dev], result.logits[k[dev], np.flatnonzero(dev)], rtol=1e-6
  )
  assert frame.oof_response_logit[~dev].isna().all()
  # oof_fold: the fold that validated each development patient (cross-conformal coverage).
  folds = np.array([m.fold for m in result.members])
  np.testing.assert_array_equal(frame.oof_fold[dev], folds[k[dev]])
  assert (frame.oof_fold[~dev] == -1).all()


def test_epoch_is_chosen_on_the_smoothed_out_of_fold_score(run):
  config, workdir, info = run
  result = info['result']
  history = result.meta['history']
  assert [h['epoch'] for h in history] == [1, 2, 3, 4]
  smoothed = [h['smoothed'] for h in history]
  assert result.best_epoch == int(np.nanargmax(smoothed)) + 1
  for prev, h in zip(history, history[1:]):  # an exponential moving average, weight 1/2
    assert h['smoothed'] == pytest.approx(0.5 * (prev['smoothed'] + h['val_metric']), abs=1e-12)
  saved = json.loads((workdir / 'run.json').read_text())
  assert saved['best_step'] == saved['selected']['epoch'] == result.best_epoch
  assert saved['selected']['on'] == 'out-of-fold'
  # run.json: members' figures out of fold only (no member's test-center figure), compile
  # counts, devices and mesh.
  assert [m['member'] for m in saved['members']] == [m.name for m in result.members]
  assert all(set(m) == {'member', 'val_auc', 'val_cindex'} for m in saved['members'])
  assert 'test' not in json.dumps(saved['members']) and 'test_auc' not in json.dumps(saved)
  assert saved['compiled'] == {'train_step': 1, 'eval_step': 1}
  assert saved['mesh'] == {'member': 1, 'data': 1} and len(saved['devices']) == 1
  # The score is the validation metric over the pooled out-of-fold predictions of that epoch
  # (checked for the selected epoch, whose member predictions the result holds).
  oof = trainer.out_of_fold(result.logits, result.splits)
  rows = ~np.isnan(oof)
  cohort = trainer.load(config)
  auc = metrics.labelled_auc_or_nan(cohort.response[rows], oof[rows])
  risk = trainer.out_of_fold(
    trainer.centred_log_risk(result.log_risk, result.splits), result.splits
  )
  cidx = metrics.cindex_or_nan(cohort.os_months[rows], cohort.os_event[rows], risk[rows])
  assert history[result.best_epoch - 1]['val_metric'] == pytest.approx((auc + cidx) / 2, abs=1e-9)


def test_checkpoint_holds_every_member(run):
  import orbax.checkpoint as ocp

  config, workdir, info = run
  best = workdir / 'checkpoints' / 'best' / str(info['best_step']) / 'state'
  restored = ocp.StandardCheckpointer().restore(best.resolve())
  leaves = [np.asarray(x) for x in jax.tree.leaves(restored['params'])]
  assert leaves and all(x.shape[0] == 3 for x in leaves)
  # The members' parameters of the selected epoch are those of the bundle.
  np.testing.assert_array_equal(
    np.concatenate([x.ravel() for x in leaves]),
    np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(info['result'].params)]),
  )


def test_explain_restores_the_first_member_exactly(run):
  """launch.explain on an ensemble workdir explains member 0 with that member's own data."""
  from moemil_jax import heatmaps

  config, workdir, info = run
  result = info['result']
  trained = heatmaps.load_run(workdir)
  for i in np.flatnonzero(trained.cohort.patch_count > 0)[:3]:
    out = heatmaps._forward(trained.model, trained.patient_inputs(trained.cohort.patient_id[i]))
    assert float(out['response_logit'][0]) == pytest.approx(result.logits[0, i], abs=1e-4)


def test_bundle_scores_like_the_ensemble(run, tmp_path):
  """The ensemble's bundle, applied to a copy of the store, gives its predictions."""
  import shutil

  from moemil_jax import predict

  config, workdir, _ = run
  frame = pd.read_parquet(workdir / 'predictions.parquet')
  moved = shutil.copytree(config.store, tmp_path / 'moved')
  model = predict.load_bundle(workdir)
  assert len(model.members) == 3 and model.operating_points['threshold_fixed_on'] == 'out_of_fold'
  got = model.predict(moved)
  np.testing.assert_allclose(got.response_prob, frame.response_prob, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.log_risk, frame.log_risk, rtol=1e-5, atol=1e-5)
  # OS probabilities from the Breslow baseline of the out-of-fold log-risks; members' spread.
  assert model.meta['uncertainty']['survival']['source'] == 'out_of_fold'
  assert got.os_prob_12m.between(0, 1).all()
  assert (got.response_prob_lo <= got.response_prob).all()
  assert (got.response_prob <= got.response_prob_hi).all()


def test_repeats_give_each_fold_its_own_seeds_and_average_out_of_fold():
  """ensemble_repeats=R: K x R members, every fold once per seed; a development patient's
  out-of-fold value is the mean of the R members holding it out."""
  c = test_config.get_config()
  c.seed, c.train.ensemble, c.train.ensemble_repeats = 7, 3, 2
  members = train.run_members(c)
  assert [(m.fold, m.seed) for m in members] == [(f, s) for f in range(3) for s in (7, 8)]
  assert len({m.name for m in members}) == 6
  splits = np.array([['val' if m.fold == p % 3 else 'train' for p in range(6)] for m in members])
  values = np.arange(36, dtype=float).reshape(6, 6)
  oof = trainer.out_of_fold(values, splits)
  for p in range(6):
    np.testing.assert_allclose(oof[p], values[[2 * (p % 3), 2 * (p % 3) + 1], p].mean())
  c.train.ensemble_repeats = 0
  with pytest.raises(ValueError, match='ensemble_repeats=0'):
    train.run_members(c)


def test_killed_ensemble_resumes_to_the_uninterrupted_predictions(run, tmp_path):
  """`launch.train` of the same ensemble, SIGKILLed after its second epoch's checkpoint and
  rerun with --resume, ends with the predictions of the uninterrupted run."""
  config, workdir, _ = run
  cmd = [
    sys.executable,
    '-m',
    'launch.train',
    '--config=moemil_jax/configs/test.py',
    f'--store={config.store}',
    f'--workdir={tmp_path}',
    '--ensemble=3',
    f'--config.train.epochs={config.train.epochs}',
  ]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  latest = tmp_path / 'checkpoints' / 'latest'
  deadline = time.time() + 300
  while not any(p.name.isdigit() and int(p.name) >= 2 for p in latest.glob('*')):
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    assert time.time() < deadline, 'no checkpoint of epoch 2 within 300 s'
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / 'predictions.parquet').exists()
  done = subprocess.run([*cmd, '--resume'], cwd=ROOT, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  assert 'resumed from epoch' in done.stderr
  want = pd.read_parquet(workdir / 'predictions.parquet')
  got = pd.read_parquet(tmp_path / 'predictions.parquet')
  for column in ('response_logit', 'log_risk', 'oof_response_logit', 'oof_log_risk'):
    np.testing.assert_allclose(got[column], want[column], rtol=1e-6, atol=1e-6)
