"""Patient splits: the external center is the test set; the rest split by patient."""

from __future__ import annotations

import numpy as np

from moemil_jax.store_reader import Cohort

SPLITS = ('train', 'val', 'test')


def assign_splits(
  cohort: Cohort,
  *,
  test_center: str = 'B',
  val_fraction: float = 0.25,
  seed: int = 0,
  folds: int = 0,
  fold: int = 0,
) -> np.ndarray:
  """test = `test_center`; the rest split by patient, stratified by response (unknown is
  its own stratum): a `val_fraction` hold-out, or fold `fold` of `folds` when folds > 1."""
  if folds > 1 and not 0 <= fold < folds:
    raise ValueError(f'split.fold={fold} outside [0, {folds})')
  split = np.where(cohort.center == test_center, 'test', 'train').astype(object)
  rng = np.random.default_rng(seed)
  strata = np.where(np.isnan(cohort.response), -1, cohort.response)
  for s in np.unique(strata):
    members = np.flatnonzero((strata == s) & (split != 'test'))
    members = members[rng.permutation(len(members))]
    if folds > 1:
      split[members[np.arange(len(members)) % folds == fold]] = 'val'
    else:
      split[members[: int(round(val_fraction * len(members)))]] = 'val'
  return split.astype(str)
