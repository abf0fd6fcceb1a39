"""A vmapped sweep of K = 4 models: members share the program and nothing else."""

import json

import jax
import numpy as np
import pytest

from feature_store import synthetic, synthetic_store
from moemil_jax import sweep, trainer
from moemil_jax.configs import test as test_config

pytestmark = pytest.mark.slow  # trains 8 models, in two orders

MEMBERS = [
  sweep.Member(0, 0, 3e-3),
  sweep.Member(1, 0, 3e-3),
  sweep.Member(0, 1, 1e-3),
  sweep.Member(1, 2, 3e-3),
]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  knobs = synthetic.Knobs(response_strength=6.0, wsi_signal=0.95, mri_signal=0.95)
  store = synthetic_store.make_store(
    tmp_path_factory.mktemp('store'),
    patients=48,
    seed=2,
    knobs=knobs,
    median_patches=40,
    max_patches=120,
  )
  c = test_config.get_config()
  c.store = str(store)
  c.train.epochs = 4
  c.split.folds = 2
  return c, sweep.load(c)


@pytest.fixture(scope='module')
def both(setup):
  config, cohort = setup
  return sweep.train_sweep(config, cohort, MEMBERS), trainer.fit(config, cohort, MEMBERS[::-1])


def test_members_do_not_depend_on_each_other(both):
  """Stacked in the reverse order, every member trains and predicts exactly as before:
  vmap shares the program and nothing else (the epoch is chosen on the pooled score, which
  the order does not change)."""
  vec, reverse = both
  np.testing.assert_allclose(
    vec.train_loss, np.array(reverse.meta['train_loss']).T[::-1], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(vec.logits, reverse.logits[::-1], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(vec.params), jax.tree.leaves(reverse.params)):
    assert a.shape[0] == len(MEMBERS)
    np.testing.assert_allclose(a, b[::-1], rtol=1e-5, atol=1e-5)
  assert vec.run_info['compiled'] == {'train_step': 1, 'eval_step': 1}


def test_members_really_differ_and_learn(both):
  vec, _ = both
  first = jax.tree.leaves(vec.params)[0]
  # Different seeds, folds and learning rates give different models.
  for i in range(1, len(MEMBERS)):
    assert not np.allclose(first[0], first[i])
  # Random batches make one member's epoch loss noisy; on average over members it falls.
  assert vec.train_loss[:, -2:].mean() < vec.train_loss[:, 0].mean()
  assert set(vec.splits[0]) == {'train', 'val', 'test'}
  # Fold 0 and fold 1 validate on complementary halves of center A.
  assert not ((vec.splits[0] == 'val') & (vec.splits[1] == 'val')).any()
  assert ((vec.splits[0] == 'val') | (vec.splits[1] == 'val') | (vec.splits[0] == 'test')).all()


def test_reports(both, setup, tmp_path):
  vec, _ = both
  config, cohort = setup
  assert list(vec.metrics.member) == [m.name for m in MEMBERS]
  assert sorted(vec.fold_metrics.fold) == [0, 1]
  from moemil_jax import metrics

  test = cohort.center == 'B'
  ens = vec.logits.mean(0)
  labelled = test & ~np.isnan(cohort.response)
  expected = metrics.roc_auc_ci(cohort.response[labelled].astype(int), ens[labelled])[0]
  assert vec.ensemble['test_auc'] == pytest.approx(expected)
  assert 0.0 <= vec.ensemble['oof_val_auc'] <= 1.0
  pred = vec.predictions
  assert len(pred) == (len(MEMBERS) + 1) * cohort.num_patients
  sweep.write(vec, tmp_path)
  summary = json.loads((tmp_path / 'sweep.json').read_text())
  assert len(summary['metrics']) == len(MEMBERS) and summary['ensemble']['members'] == 4
  # By default no member's test metric is shown, except the one chosen on validation.
  assert summary['report_test'] == 'selected'
  assert all('test_auc' not in r and 'val_auc' in r for r in summary['metrics'])
  assert not any(k.startswith('test_') for r in summary['fold_metrics'] for k in r)
  score = vec.metrics[['val_auc', 'val_cindex']].mean(axis=1)
  best = vec.metrics.loc[score.idxmax()]
  assert summary['selected_member']['member'] == best.member
  assert summary['selected_member']['test_auc'] == pytest.approx(best.test_auc)
  sweep.write(vec, tmp_path / 'all', report_test='all')
  every = json.loads((tmp_path / 'all' / 'sweep.json').read_text())
  assert all('test_auc' in r for r in every['metrics'])


def test_bad_fold_is_refused(setup):
  config, cohort = setup
  c = config.copy_and_resolve_references()
  c.split.folds = 0
  with pytest.raises(ValueError, match='split.folds'):
    sweep.train_sweep(c, cohort, [sweep.Member(1, 0, 1e-3)])
