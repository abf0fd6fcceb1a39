"""Patient splits: the external center is the test set; the rest split by patient.

`config.split.test_center` names the external center; '' (the default) means the second
center by name (B of a synthetic store's A and B). `resolve_test_center` turns the setting
into a center of the store; `check_development_size` refuses a store too small to split.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moemil_jax.store_reader import Cohort

SPLITS = ('train', 'val', 'test')
# Fewer development patients cannot be split into training and validation patients in any
# useful way: validation metrics would be undefined or rest on one or two patients.
MIN_DEVELOPMENT_PATIENTS = 10


class SplitError(ValueError):
  """The cohort cannot be split as configured; the message says what to change."""


def center_order(centers: Sequence[str]) -> list[str]:
  """The store's centers, sorted by name: the order '' counts in (the second is external)."""
  return sorted({str(c) for c in centers})


def default_test_center(centers: Sequence[str]) -> str:
  """The second center by name, or '' when the cohort has only one (no external test)."""
  names = center_order(centers)
  return names[1] if len(names) > 1 else ''


def resolve_test_center(centers: Sequence[str], test_center: str) -> tuple[str, str]:
  """(the external center, a log line saying which and why). An explicit center the store
  does not hold is refused; '' picks the second center by name."""
  names = center_order(centers)
  if test_center:
    if test_center not in names:
      raise SplitError(
        f'config.split.test_center={test_center!r} is not a center of this store (centers: '
        f'{", ".join(names)}); set --config.split.test_center to one of them'
      )
    return test_center, f'external test center: {test_center} (config.split.test_center)'
  chosen = default_test_center(names)
  if not chosen:
    return '', (
      f'one center ({names[0] if names else "none"}): no external test split; every patient '
      'is a development patient'
    )
  return chosen, (
    f'external test center: {chosen} (the second of centers {", ".join(names)} by name; '
    '--config.split.test_center=NAME chooses another)'
  )


def check_development_size(
  centers: Sequence[str], test_center: str, *, folds: int = 0, store: str = ''
) -> None:
  """Refuses a cohort with too few development patients for training and validation."""
  centers = np.asarray([str(c) for c in centers])
  development = int((centers != test_center).sum()) if test_center else len(centers)
  where = f'{store}: ' if store else ''
  external = f' (and {len(centers) - development} in the external center {test_center})'
  counted = f'{where}{development} development patients{external if test_center else ""}'
  if development < MIN_DEVELOPMENT_PATIENTS:
    raise SplitError(
      f'{counted}; training needs at least {MIN_DEVELOPMENT_PATIENTS} to hold out validation '
      'patients: add patients, or check config.split.test_center'
    )
  if folds > 1 and development < 2 * folds:
    raise SplitError(
      f'{counted} cannot fill {folds} folds of at least 2 patients: lower --ensemble or '
      'config.split.folds'
    )


def assign_splits(
  cohort: Cohort,
  *,
  test_center: str = '',
  val_fraction: float = 0.25,
  seed: int = 0,
  folds: int = 0,
  fold: int = 0,
) -> np.ndarray:
  """test = `test_center` ('' = the second center by name); the rest split by patient,
  stratified by response (unknown is its own stratum): a `val_fraction` hold-out, or fold
  `fold` of `folds` when folds > 1."""
  if folds > 1 and not 0 <= fold < folds:
    raise ValueError(f'split.fold={fold} outside [0, {folds})')
  test_center = test_center or default_test_center(cohort.center)
  split = np.where((cohort.center == test_center) & bool(test_center), 'test', 'train').astype(
    object
  )
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
