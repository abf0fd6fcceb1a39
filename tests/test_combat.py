"""ComBat to the development center: a known shift at center B is removed, center A untouched."""

import numpy as np
import pandas as pd
import pytest

from feature_store import synthetic_store
from moemil_jax import combat, preprocess, store_reader
from moemil_jax.configs import test as test_config


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  store = synthetic_store.make_store(
    tmp_path_factory.mktemp('combat'), patients=120, seed=2, median_patches=8, max_patches=20
  )
  return store_reader.load_store(store)


def test_combat_removes_a_known_center_shift_and_keeps_the_reference(cohort):
  """Radiomics drawn from one distribution per feature at both centers, then center B's
  shifted by a known location and scale; ComBat must undo the shift to within sampling
  error and leave center A's values bit for bit."""
  rng = np.random.default_rng(0)
  n, f = len(cohort.center), 12
  mu, sd = rng.normal(0, 5, f), rng.uniform(0.5, 3, f)
  clean = mu + sd * rng.normal(size=(n, f))
  b = cohort.center == 'B'
  assert 30 <= b.sum() <= n - 30
  scale, shift = rng.uniform(1.5, 3, f), rng.choice([-1, 1], f) * rng.uniform(2, 6, f)
  shifted = np.where(b[:, None], clean * scale + shift, clean)
  cohort.radiomics = pd.DataFrame(shifted, columns=[f't1:f{i}' for i in range(f)])
  cohort.radiomics.iloc[3, :] = np.nan  # a patient without MRI stays without radiomics
  config = test_config.get_config().data
  config.harmonise = 'combat'
  config.min_center_patients = 10
  assert preprocess.harmonise(cohort, config) == 'combat'
  out = cohort.radiomics.to_numpy()
  a = ~b
  np.testing.assert_array_equal(out[a], shifted[a])  # reference values unchanged (NaN row too)
  assert np.isnan(out[3]).all()
  ok = b & ~np.isnan(out).any(axis=1)
  # B's per-feature mean and SD are A's within sampling error (ComBat's shrinkage is mild
  # with 12 features; the test allows 4 standard errors of a mean and of an SD).
  ref = shifted[a & ~np.isnan(shifted).any(axis=1)]
  se_mean = sd * np.sqrt(1 / ok.sum() + 1 / len(ref))
  assert np.all(np.abs(out[ok].mean(0) - ref.mean(0)) < 4 * se_mean)
  se_sd = sd * np.sqrt(1 / (2 * ok.sum()) + 1 / (2 * len(ref)))
  assert np.all(np.abs(out[ok].std(0) - ref.std(0)) < 4 * se_sd)
  # Before harmonisation every feature was shifted far outside that error.
  before_mean = np.abs(shifted[ok].mean(0) - ref.mean(0)) > 4 * se_mean
  before_sd = np.abs(shifted[ok].std(0) - ref.std(0)) > 4 * se_sd
  assert np.all(before_mean | before_sd)
  for j in range(f):
    assert np.corrcoef(out[ok, j], clean[ok, j])[0, 1] > 0.999


def test_combat_refuses_a_center_too_small(cohort):
  values = pd.DataFrame(np.random.default_rng(1).normal(size=(len(cohort.center), 3)))
  with pytest.raises(ValueError, match="center 'B' has .* fewer than 500"):
    combat.combat_to_reference(values, cohort.center, ['A'], min_patients=500)
  with pytest.raises(ValueError, match='no patient of the reference'):
    combat.combat_to_reference(values, cohort.center, ['C'])


def test_reference_mode_is_read_as_none():
  config = test_config.get_config().data
  config.harmonise = 'reference'
  assert preprocess.harmonise_mode(config) == 'none'
