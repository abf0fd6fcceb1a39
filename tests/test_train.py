"""Training end to end on a small synthetic store: learning, outputs, checkpoints, resume."""

import json

import jax
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from feature_store import synthetic, synthetic_store
from moemil_jax import train, trainer
from moemil_jax.configs import dlr, pathomics
from moemil_jax.configs import test as test_config

EPOCHS = 10


def _config(store):
  c = test_config.get_config()
  c.store = str(store)
  c.train.epochs = EPOCHS
  return c


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  knobs = synthetic.Knobs(response_strength=6.0, wsi_signal=0.95, mri_signal=0.95)
  return synthetic_store.make_store(
    tmp_path_factory.mktemp('store'),
    patients=60,
    seed=0,
    knobs=knobs,
    median_patches=40,
    max_patches=120,
  )


@pytest.fixture(scope='module')
def full_run(store, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('full')
  info = train.train_and_evaluate(_config(store), workdir)
  return workdir, info


def test_loss_decreases_and_beats_chance(full_run):
  workdir, info = full_run
  losses = [h['train_loss'] for h in info['history']]
  assert np.mean(losses[-3:]) < losses[0]
  pred = pd.read_parquet(workdir / 'predictions.parquet')
  held_out = pred[(pred.split != 'train') & pred.ic_response.notna()]
  assert roc_auc_score(held_out.ic_response.astype(int), held_out.response_prob) > 0.65


def test_predictions_and_run_json_contract(full_run, store):
  workdir, _ = full_run
  pred = pd.read_parquet(workdir / 'predictions.parquet')
  clinical = pd.read_parquet(store / 'clinical.parquet')
  assert list(pred.patient_id) == list(clinical.patient_id)
  assert set(pred.split) == {'train', 'val', 'test'}
  assert (pred.split == 'test').equals(pred.center == 'B')
  assert (pred.model == 'moemil').all()
  for col in ('response_logit', 'response_prob', 'log_risk', 'os_months'):
    assert pred[col].dtype == np.float64
  assert np.isfinite(pred[['response_logit', 'log_risk']].to_numpy()).all()
  assert str(pred.ic_response.dtype) == 'Int64' and pred.os_event.dtype == np.int64
  np.testing.assert_allclose(pred.response_prob, 1 / (1 + np.exp(-pred.response_logit)))
  gates = pred.filter(like='gate_response_').to_numpy()
  np.testing.assert_allclose(gates.sum(1), 1.0, rtol=1e-5)
  run = json.loads((workdir / 'run.json').read_text())
  assert run['model'] == 'moemil' and run['store'] == str(store.resolve())
  assert run['seed'] == 0 and run['config']['train']['epochs'] == EPOCHS
  # The epoch is chosen on the smoothed validation score (the first of equal ones).
  best = max(range(EPOCHS), key=lambda i: (run['history'][i]['smoothed'] or -1, -i))
  assert run['best_step'] == run['selected']['epoch'] == best + 1
  assert run['selected']['on'] == 'validation'
  assert run['val_metric'] == pytest.approx(run['history'][best]['smoothed'])
  assert run['compiled'] == {'train_step': 1, 'eval_step': 1}
  assert run['mesh'] == {'member': 1, 'data': 1} and run['devices'] == [str(jax.devices()[0])]


def test_checkpoints_best_and_latest(full_run):
  workdir, info = full_run
  latest = sorted(p.name for p in (workdir / 'checkpoints' / 'latest').iterdir())
  best = sorted(p.name for p in (workdir / 'checkpoints' / 'best').iterdir())
  assert latest == [str(EPOCHS)]
  assert best == [str(info['best_step'])]
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))


def test_resume_matches_uninterrupted_and_same_seed_is_identical(full_run, store, tmp_path):
  workdir, _ = full_run
  config = _config(store)
  stopped = train.train_and_evaluate(config, tmp_path, stop_after_epochs=4)
  assert stopped == {'stopped_at_epoch': 4}
  assert not (tmp_path / 'predictions.parquet').exists()
  with pytest.raises(FileExistsError, match='--resume'):
    train.train_and_evaluate(config, tmp_path)
  info = train.train_and_evaluate(config, tmp_path, resume=True)
  assert info['epochs_run'] == EPOCHS
  a = pd.read_parquet(workdir / 'predictions.parquet')
  b = pd.read_parquet(tmp_path / 'predictions.parquet')
  pd.testing.assert_frame_equal(a, b)  # identical, not merely close
  full = json.loads((workdir / 'run.json').read_text())
  assert info['history'] == full['history']


def test_baseline_configs_use_only_their_modality():
  for module, present, absent in [
    (dlr, ('radiomics', 'mri_deep'), ('wsi',)),
    (pathomics, ('wsi',), ('radiomics', 'mri_deep')),
  ]:
    config = module.get_config()
    assert tuple(config.model.modalities) == present
    model = trainer.build_model(config, radiomics_dim=5)

    def branch(m):  # the slide reaches the model through prototypes by default
      return model.wsi_vector if m == 'wsi' else getattr(model, m)

    for m in present:
      assert branch(m) is not None
    for m in absent:
      assert branch(m) is None and (m != 'wsi' or model.wsi is None)


@pytest.mark.slow  # day-to-day subset stays under 3 minutes
def test_one_compiled_step_whatever_the_bag_sizes(tmp_path, caplog):
  """Bags from 16 to 20,000 patches (lognormal): one training and one evaluation program."""
  import logging

  store = synthetic_store.make_store(
    tmp_path / 'store', patients=24, seed=3, median_patches=150, bag_sigma=2.0
  )
  from moemil_jax import store_reader

  counts = store_reader.load_store(store).patch_count
  assert counts.min() <= 32 and counts.max() >= 15000  # the range the test is about
  c = test_config.get_config()
  c.store = str(store)
  c.train.epochs = 2
  c.train.batch_size = 4
  with caplog.at_level(logging.INFO, logger='absl'):
    info = train.train_and_evaluate(c, tmp_path / 'run')
  assert info['compiled'] == {'train_step': 1, 'eval_step': 1}
  assert 'train_step compiled 1 times' in caplog.text
  assert info['step_shape']['eval_patch_slots'] >= counts.max()


def test_no_validation_patients_stops_with_one_line(store, tmp_path):
  c = _config(store)
  c.split.val_fraction = 0.0
  with pytest.raises(ValueError, match='no validation patients') as err:
    train.train_and_evaluate(c, tmp_path)
  assert '\n' not in str(err.value)


def test_nan_validation_metric_never_replaces_the_best_epoch():
  meta = trainer._fresh_meta()

  def epoch(score):
    meta['epoch'] += 1
    return trainer._select(meta, score, score, score, patience=0)

  assert epoch(float('nan'))  # the first epoch is kept, whatever its score
  assert epoch(0.6) and meta['best_epoch'] == 2  # after a NaN, the score itself
  assert not epoch(float('nan'))  # a NaN never improves ...
  assert meta['smoothed'] is None and meta['best_score'] == pytest.approx(0.6)
  assert epoch(0.7)  # ... and restarts the smoothing
  assert not epoch(0.5)  # smoothed 0.6 < 0.7
  assert meta['history'][-1]['smoothed'] == pytest.approx(0.6)


def test_patience_stops_all_members_together():
  meta = trainer._fresh_meta()
  for score in (0.7, 0.6, 0.6):
    meta['epoch'] += 1
    trainer._select(meta, score, score, score, patience=2)
  assert meta['done'] and meta['best_epoch'] == 1 and meta['bad_epochs'] == 2
