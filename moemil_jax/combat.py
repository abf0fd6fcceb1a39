"""ComBat harmonisation of radiomics to the development center (`data.harmonise='combat'`).

Scanners and protocols shift each hospital's radiomics by a per-feature location and scale.
ComBat (Johnson et al. 2007; Fortin et al. 2018 for imaging features) estimates each center's
shift with empirical-Bayes shrinkage across features and removes it. With a reference batch
(Zhang et al. 2018) the reference's values are left exactly as they are and every other center
is mapped onto it, so the models are trained on the development center's own values.

The estimation is done by inmoose's `pycombat_norm` (a maintained Python port of sva's
ComBat, with `ref_batch`). It is transductive: each non-reference center's shift is estimated
from that center's own patients (no outcomes), the external test's included, so a new center
needs a batch of patients before it can be scored, as with 'per_center'.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from absl import logging

REFERENCE = '__reference__'
MIN_PATIENTS = 2  # per center, with radiomics: a variance needs two


def combat_to_reference(
  values: pd.DataFrame, center: np.ndarray, reference: Sequence[str], *, min_patients: int = 2
) -> pd.DataFrame:
  """`values` (patients x features, NaN where missing) with every center outside `reference`
  mapped onto the reference centers (pooled as one reference batch; their rows unchanged).

  Patients without radiomics stay all-NaN; a missing value stays missing (ComBat sees it as
  its center's mean, which moves no estimate of location). Features constant within some
  center cannot be scaled and are left unchanged. Raises ValueError when a center has fewer
  than `min_patients` patients with radiomics, or the reference has none.
  """
  from inmoose.pycombat import pycombat_norm

  center = np.asarray(center).astype(str)
  reference = {str(c) for c in reference}
  rows = values.notna().any(axis=1).to_numpy()
  batch = np.where(np.isin(center, list(reference)), REFERENCE, center)
  names, counts = np.unique(batch[rows], return_counts=True)
  if REFERENCE not in names:
    raise ValueError(
      f'data.harmonise=combat: no patient of the reference center(s) {sorted(reference)} has '
      'radiomics; ComBat needs the development center in the same store'
    )
  for name, n in zip(names, counts):
    name = 'the reference' if name == REFERENCE else str(name)
    if n < max(min_patients, MIN_PATIENTS):
      raise ValueError(
        f'data.harmonise=combat: center {name!r} has {n} patients with radiomics, fewer than '
        f'{max(min_patients, MIN_PATIENTS)} (data.min_center_patients); its shift cannot be '
        "estimated: use data.harmonise='none' or more patients"
      )
  out = values.copy()
  if len(names) == 1:  # only the reference: nothing to harmonise
    return out
  x = values.to_numpy(np.float64)[rows]
  b = batch[rows]
  missing = np.isnan(x)
  # Missing values take their center's mean, so they move neither location nor scale much.
  for name in names:
    sel = b == name
    means = np.nanmean(np.where(missing[sel], np.nan, x[sel]), axis=0)
    x[sel] = np.where(missing[sel], np.nan_to_num(means)[None], x[sel])
  scalable = np.ones(x.shape[1], bool)
  for name in names:
    scalable &= x[b == name].std(0) > 1e-12
  if scalable.any():
    adjusted = np.asarray(pycombat_norm(x[:, scalable].T, list(b), ref_batch=REFERENCE)).T
    x[:, scalable] = adjusted
  x[missing] = np.nan
  ref = b == REFERENCE
  x[ref] = values.to_numpy(np.float64)[rows][ref]  # exactly unchanged, not merely close
  out.loc[rows, :] = x
  logging.info(
    'radiomics ComBat-harmonised to reference %s: %d of %d features (others constant in some '
    'center), centers %s',
    sorted(reference),
    int(scalable.sum()),
    x.shape[1],
    [n for n in names if n != REFERENCE],
  )
  return out
