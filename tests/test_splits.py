"""Splits: the external center by name ('' = the second by name), too few patients refused."""

import numpy as np
import pytest

from moemil_jax import splits
from moemil_jax.store_reader import Cohort


def _cohort(centers, response):
  n = len(centers)
  return Cohort(
    patient_id=np.array([f'P{i}' for i in range(n)]),
    center=np.array(centers),
    response=np.asarray(response, float),
    os_months=np.ones(n),
    os_event=np.zeros(n, np.int64),
    patches=np.zeros((0, 4), np.float16),
    patch_offset=np.zeros(n, np.int64),
    patch_count=np.zeros(n, np.int64),
    radiomics=None,
    mri_deep=np.zeros((n, 1, 4), np.float32),
    mri_deep_count=np.zeros(n, np.int64),
  )


def test_default_test_center_is_the_second_by_name_whatever_the_row_order():
  # A synthetic store's first patient may be in B: the order of rows does not matter.
  assert splits.resolve_test_center(['B', 'A', 'A'], '')[0] == 'B'
  center, note = splits.resolve_test_center(['Guangzhou', 'Foshan', 'Zhuhai'], '')
  assert center == 'Guangzhou' and 'Foshan, Guangzhou, Zhuhai' in note
  assert splits.resolve_test_center(['A', 'B'], 'A')[0] == 'A'
  assert splits.resolve_test_center(['A'], '')[0] == ''  # one center: no external test
  with pytest.raises(splits.SplitError, match="test_center='C' is not a center.*A, B"):
    splits.resolve_test_center(['A', 'B'], 'C')


def test_assign_splits_resolves_the_default_like_launch_does():
  rng = np.random.default_rng(0)
  centers = np.where(rng.random(40) < 0.3, 'Zhuhai', 'Foshan')
  cohort = _cohort(centers, rng.integers(0, 2, 40))
  default = splits.assign_splits(cohort, val_fraction=0.25)
  named = splits.assign_splits(cohort, test_center='Zhuhai', val_fraction=0.25)
  np.testing.assert_array_equal(default, named)
  assert ((default == 'test') == (centers == 'Zhuhai')).all()
  assert (default == 'val').any()


def test_too_few_development_patients_are_refused():
  splits.check_development_size(['A'] * 10 + ['B'] * 3, 'B')
  with pytest.raises(splits.SplitError, match='9 development patients.*at least 10'):
    splits.check_development_size(['A'] * 9 + ['B'] * 3, 'B', store='s')
  with pytest.raises(splits.SplitError, match='cannot fill 6 folds.*lower --ensemble'):
    splits.check_development_size(['A'] * 11, '', folds=6)
