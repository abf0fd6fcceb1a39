"""Preprocessing fitted on training patients only: radiomics selection and scaling,
feature statistics, and per-center harmonisation."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pandas as pd
from absl import logging

from moemil_jax import parallel, prototypes
from moemil_jax.store_reader import Cohort


@dataclasses.dataclass
class RadiomicsSelection:
  """Radiomics columns kept, their training transform, and one missingness flag per sequence.

  `mean`/`std` are the training statistics of the kept columns (on the transformed scale for
  'quantile'). A value missing for a patient with MRI (a sequence that failed or was not
  acquired) is imputed with the training centre (0 after the transform), and the flag of
  its sequence says so, so that one patient's missing sequence never removes that sequence's
  features for everyone.
  """

  columns: list[str]
  mean: np.ndarray
  std: np.ndarray
  sequences: list[str] = dataclasses.field(default_factory=list)  # one indicator each
  quantile: Any = None  # fitted sklearn QuantileTransformer ('quantile' transform) or None

  @property
  def width(self) -> int:
    return len(self.columns) + len(self.sequences)

  def transform(self, wide: pd.DataFrame) -> np.ndarray:
    if not self.columns:
      return np.zeros((len(wide), 1), np.float32)
    x = wide.reindex(columns=self.columns).to_numpy(np.float64)  # absent columns: imputed
    missing = np.isnan(x)
    if self.quantile is not None:
      x = self.quantile.transform(x)  # NaN stays NaN
    x = np.where(missing, 0.0, np.clip((x - self.mean) / self.std, -10, 10))
    flags = [
      wide[[c for c in wide.columns if c.startswith(f'{seq}:')]].isna().all(axis=1).to_numpy()
      for seq in self.sequences
    ]
    if flags:
      x = np.concatenate([x, np.stack(flags, 1).astype(np.float64)], 1)
    return x.astype(np.float32)


@dataclasses.dataclass
class Fitted:
  """Everything preprocessing learned from the training patients: enough to score anyone.

  Saved in a model bundle (`moemil_jax/bundle.py`) as arrays (orbax) plus JSON metadata,
  never pickled.
  """

  radiomics: RadiomicsSelection
  deep_mean: np.ndarray  # (2048,) deep MRI features, training slices
  deep_std: np.ndarray
  patch_mean: np.ndarray  # (D,) patch embeddings, training patches
  patch_inv_std: np.ndarray
  radiomics_abs_z_max: np.ndarray  # (F,) largest |z| of each kept column in training
  bag_range: tuple[int, int]  # smallest and largest non-empty training bag
  slide_prototypes: prototypes.SlidePrototypes | None = None  # data.slide_prototypes > 0

  def arrays(self) -> dict[str, np.ndarray]:
    out = {
      'deep_mean': self.deep_mean,
      'deep_std': self.deep_std,
      'patch_mean': self.patch_mean,
      'patch_inv_std': self.patch_inv_std,
      'radiomics_mean': self.radiomics.mean,
      'radiomics_std': self.radiomics.std,
      'radiomics_abs_z_max': self.radiomics_abs_z_max,
    }
    if self.radiomics.quantile is not None:
      out['quantiles'] = self.radiomics.quantile.quantiles_
      out['references'] = self.radiomics.quantile.references_
    if self.slide_prototypes is not None:
      out |= {f'prototypes_{k}': v for k, v in self.slide_prototypes.arrays().items()}
    return {k: np.asarray(v) for k, v in out.items()}

  def metadata(self) -> dict[str, Any]:
    return {
      'radiomics_columns': list(self.radiomics.columns),
      'radiomics_sequences': list(self.radiomics.sequences),
      'radiomics_transform': 'quantile' if self.radiomics.quantile is not None else 'zscore',
      'bag_range': [int(b) for b in self.bag_range],
      'slide_prototypes': self.slide_prototypes is not None,
    }

  @classmethod
  def from_saved(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> 'Fitted':
    quantile = None
    if meta['radiomics_transform'] == 'quantile':
      from sklearn.preprocessing import QuantileTransformer

      q = np.asarray(arrays['quantiles'], np.float64)
      quantile = QuantileTransformer(n_quantiles=len(q), output_distribution='normal')
      quantile.quantiles_ = q
      quantile.references_ = np.asarray(arrays['references'], np.float64)
      quantile.n_features_in_ = q.shape[1]
    selection = RadiomicsSelection(
      list(meta['radiomics_columns']),
      np.asarray(arrays['radiomics_mean'], np.float64),
      np.asarray(arrays['radiomics_std'], np.float64),
      sequences=list(meta['radiomics_sequences']),
      quantile=quantile,
    )
    return cls(
      selection,
      np.asarray(arrays['deep_mean']),
      np.asarray(arrays['deep_std']),
      np.asarray(arrays['patch_mean'], np.float32),
      np.asarray(arrays['patch_inv_std'], np.float32),
      np.asarray(arrays['radiomics_abs_z_max'], np.float64),
      tuple(meta['bag_range']),
      prototypes.SlidePrototypes.from_arrays(
        {k: arrays[f'prototypes_{k}'] for k in prototypes.ARRAYS}
      )
      if meta.get('slide_prototypes')
      else None,
    )


def fit_radiomics(
  wide: pd.DataFrame,
  train: np.ndarray,
  response: np.ndarray,
  *,
  corr_threshold: float = 0.9,
  lasso: bool = True,
  lasso_cs: int = 10,
  seed: int = 0,
  transform: str = 'zscore',
  min_present: float = 0.5,
  top_k: int = 0,
  os_months: np.ndarray | None = None,
  os_event: np.ndarray | None = None,
) -> RadiomicsSelection:
  """Fitted on training patients with MRI only.

  Keeps columns present for at least `min_present` of them (so a few patients missing a
  sequence do not drop it for everyone) and not constant; transforms them ('zscore', or
  'quantile': a rank-based map to a normal distribution, robust to heavy tails, outliers and
  the very different scales of radiomics features); then an optional greedy correlation
  filter; then `top_k` > 0 keeps the k columns with the strongest univariate association
  with the outcomes (|AUC - 0.5| on response plus |C-index - 0.5| on OS when given: stable
  under resampling and survival-aware), and/or penalised selection (`lasso`): an L1 logistic
  regression on response, joined, when OS is given, by an L1 Cox model on OS (scikit-survival's
  Coxnet), so that features that carry survival but not response reach the survival side
  (on ~200 patients the LASSO's selection swings from 3 to 545 columns between folds).
  Sequences missing for some training patients get a missingness indicator column.
  """
  rows = train & wide.notna().any(axis=1).to_numpy()
  x = wide[rows]
  present = x.notna().mean()
  cols = [
    c for c in x.columns if present[c] >= min_present and x[c].std(ddof=0, skipna=True) > 1e-12
  ]
  if not cols:
    logging.warning('radiomics: no usable column on %d training patients', rows.sum())
    return RadiomicsSelection([], np.zeros(0), np.ones(0))
  values = x[cols].to_numpy(np.float64)
  quantile = None
  if transform == 'quantile':
    from sklearn.preprocessing import QuantileTransformer

    quantile = QuantileTransformer(
      n_quantiles=min(1000, len(values)), output_distribution='normal', random_state=seed
    ).fit(values)  # NaNs are ignored when fitting
    values = quantile.transform(values)
  elif transform != 'zscore':
    raise ValueError(f"data.radiomics_transform {transform!r}: use 'zscore' or 'quantile'")
  mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
  std = np.where(std > 1e-12, std, 1.0)
  z = np.nan_to_num((values - mean) / std)
  sequences = sorted({c.split(':')[0] for c in cols if x[c].isna().any() and ':' in c})
  n_start = len(cols)
  keep = np.arange(len(cols))
  if corr_threshold and 0 < corr_threshold < 1 and len(cols) > 1:
    corr = np.abs(np.corrcoef(z, rowvar=False))
    kept: list[int] = []
    for j in range(len(cols)):
      if all(corr[j, i] <= corr_threshold for i in kept):
        kept.append(j)
    keep = np.array(kept)
  if top_k and len(keep) > top_k:
    survival = None if os_months is None else (os_months[rows], os_event[rows])
    keep = _univariate_select(z, keep, response[rows], survival, top_k)
  if lasso:
    chosen = _lasso_select(z, keep, response[rows], lasso_cs, seed)
    if os_months is not None:  # survival's own selection joins response's
      chosen = np.union1d(chosen, _coxnet_select(z, keep, os_months[rows], os_event[rows], seed))
    keep = chosen
  logging.info(
    'radiomics: %d columns -> %d usable (%d present for under %.0f%% of training patients '
    'with MRI) -> %d selected%s',
    wide.shape[1],
    n_start,
    int((present < min_present).sum()),
    100 * min_present,
    len(keep),
    f'; missing-sequence indicators for {sequences}' if sequences else '',
  )
  if quantile is not None:  # keep only the selected columns' quantiles
    quantile.quantiles_ = quantile.quantiles_[:, keep]
    quantile.n_features_in_ = len(keep)
  return RadiomicsSelection(
    [cols[i] for i in keep], mean[keep], std[keep], sequences=sequences, quantile=quantile
  )


def _univariate_select(z, keep, y, survival, top_k: int) -> np.ndarray:
  """The top_k columns of `keep` by |AUC - 0.5| on response (+ |C-index - 0.5| on OS)."""
  from scipy.stats import rankdata

  score = np.zeros(len(keep))
  labelled = ~np.isnan(y)
  pos, neg = (y[labelled] == 1).sum(), (y[labelled] == 0).sum()
  if pos and neg:  # Mann-Whitney AUC of every column at once
    ranks = rankdata(z[labelled][:, keep], axis=0)
    auc = (ranks[y[labelled] == 1].sum(0) - pos * (pos + 1) / 2) / (pos * neg)
    score += np.abs(auc - 0.5)
  if survival is not None:
    t, e = survival
    known = ~np.isnan(t)
    if e[known].sum() > 0:
      from moemil_jax import metrics

      score += np.array(
        [abs(metrics.cindex_or_nan(t[known], e[known], z[known, j]) - 0.5) for j in keep]
      )
  order = np.argsort(-score, kind='stable')[:top_k]
  return keep[np.sort(order)]


def _lasso_select(z, keep, y, lasso_cs: int, seed: int) -> np.ndarray:
  """Columns of `keep` with a non-zero L1 logistic coefficient (C by CV AUC) on response."""
  labelled = ~np.isnan(y)
  classes, n_per = np.unique(y[labelled], return_counts=True)
  if len(classes) != 2 or n_per.min() < 3:
    logging.warning('radiomics LASSO skipped: too few labelled training patients')
    return keep
  import sklearn
  from sklearn.linear_model import LogisticRegressionCV

  modern = tuple(int(v) for v in sklearn.__version__.split('.')[:2]) >= (1, 8)
  l1 = dict(l1_ratios=(1.0,), use_legacy_attributes=False) if modern else dict(penalty='l1')
  clf = LogisticRegressionCV(
    Cs=lasso_cs,
    cv=min(5, int(n_per.min())),
    solver='liblinear',
    scoring='roc_auc',
    random_state=seed,
    max_iter=1000,
    **l1,
  )
  clf.fit(z[labelled][:, keep], y[labelled].astype(int))
  chosen = np.flatnonzero(np.abs(clf.coef_[0]) > 0)
  if not len(chosen):
    logging.warning('radiomics LASSO selected nothing; keeping %d columns', len(keep))
    return keep
  return keep[chosen]


def _coxnet_select(z, keep, t, e, seed: int, folds: int = 5) -> np.ndarray:
  """Columns of `keep` with a non-zero coefficient in an L1-penalised Cox model on OS.

  The penalty is the one with the best cross-validated C-index on the training patients
  (folds stratified by event); the path is scikit-survival's `CoxnetSurvivalAnalysis`.
  """
  known = ~np.isnan(t) & ~np.isnan(e)
  t, e, x = t[known], e[known].astype(bool), z[known][:, keep]
  if e.sum() < 2 * folds:
    logging.warning('radiomics Cox selection skipped: %d events in training', int(e.sum()))
    return keep[:0]
  from sklearn.model_selection import StratifiedKFold
  from sksurv.linear_model import CoxnetSurvivalAnalysis
  from sksurv.util import Surv

  from moemil_jax import metrics

  y = Surv.from_arrays(e, t)
  path = CoxnetSurvivalAnalysis(l1_ratio=1.0, alpha_min_ratio=0.05, n_alphas=30)
  alphas = path.fit(x, y).alphas_
  score = np.zeros(len(alphas))
  split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, e)
  for fit_rows, held in split:
    model = CoxnetSurvivalAnalysis(l1_ratio=1.0, alphas=alphas).fit(x[fit_rows], y[fit_rows])
    for a, alpha in enumerate(alphas):
      risk = model.predict(x[held], alpha=alpha)
      c = metrics.cindex_or_nan(t[held], e[held], risk) if np.ptp(risk) > 0 else 0.5
      score[a] += (0.5 if np.isnan(c) else c) / folds
  best = alphas[int(np.argmax(score))]
  coef = CoxnetSurvivalAnalysis(l1_ratio=1.0, alphas=[best]).fit(x, y).coef_[:, 0]
  logging.info(
    'radiomics Cox selection: %d columns (penalty %.3g, CV C-index %.3f)',
    int((coef != 0).sum()),
    best,
    score.max(),
  )
  return keep[np.flatnonzero(coef != 0)]


def masked_mean_std(
  x: np.ndarray, rows: np.ndarray, counts: np.ndarray, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean/std over the valid slices of the selected rows (float64 sums)."""
  sel = [x[i, : counts[i]] for i in np.flatnonzero(rows) if counts[i]]
  if not sel:
    return np.zeros(x.shape[-1]), np.ones(x.shape[-1])
  return _mean_std(np.concatenate(sel), chunk)


def _mean_std(
  x: np.ndarray, chunk: int = 65536, *, all_processes: bool = False
) -> tuple[np.ndarray, np.ndarray]:
  """Per-feature mean/std (float64 sums); all_processes: over every process's rows."""
  s = np.zeros(x.shape[1])
  ss = np.zeros(x.shape[1])
  for start in range(0, len(x), chunk):
    block = x[start : start + chunk].astype(np.float64)
    s += block.sum(0)
    ss += (block * block).sum(0)
  n = float(len(x))
  if all_processes:
    s, ss, n = parallel.sum_over_processes((s, ss, n))
    n = float(n)
  mean = s / max(n, 1)
  std = np.sqrt(np.maximum(ss / max(n, 1) - mean * mean, 0.0))
  return mean, np.where(std > 1e-6, std, 1.0)


def _read_patch_rows(cohort: Cohort, rows: np.ndarray) -> np.ndarray:
  """Indices into cohort.patches of the selected patients' bags that this process read."""
  rows = rows & (cohort.patch_offset >= 0)
  return np.concatenate(
    [np.arange(o, o + c) for o, c in zip(cohort.patch_offset[rows], cohort.patch_count[rows])]
    + [np.zeros(0, np.int64)]
  )


HARMONISE_MODES = ('none', 'per_center', 'combat')


def harmonise_mode(data_config) -> str:
  """config.data.harmonise ('none', 'per_center' or 'combat'); the older boolean
  `harmonise_centers = True` means 'per_center', and the older 'reference' (which changed
  nothing) means 'none'."""
  mode = data_config.get('harmonise', None) or (
    'per_center' if data_config.get('harmonise_centers', False) else 'none'
  )
  if mode == 'reference':
    logging.warning(
      "data.harmonise='reference' changed nothing and is read as 'none'; for harmonisation "
      "to the development center use 'combat'"
    )
    return 'none'
  if mode not in HARMONISE_MODES:
    raise ValueError(f'data.harmonise={mode!r}: choose one of {HARMONISE_MODES}')
  return mode


def combat_reference(data_config, centers) -> list[str]:
  """The reference centers of 'combat': `data.combat_reference` (comma-separated) when set,
  else every center but the external test center by the split's default rule (the second
  center by name, `splits.default_test_center`): set it when `split.test_center` names
  another."""
  from moemil_jax import splits

  named = str(data_config.get('combat_reference', '') or '')
  if named:
    return [c.strip() for c in named.split(',') if c.strip()]
  test = splits.default_test_center(centers)
  return [c for c in splits.center_order(centers) if c != test]


def harmonise(cohort: Cohort, data_config) -> str:
  """Applies config.data.harmonise to the cohort (in place); returns the mode.

  'none' changes nothing here: every normalisation statistic (patches, deep MRI, radiomics
  scaling and selection) is fitted on the training patients, who all come from the
  development center(s), and applied unchanged to every center, so a new patient is scored
  on their own. 'per_center' is transductive: each center's features are standardised with
  that center's own unlabelled patients (at least `data.min_center_patients`), which removes
  location and scale shifts between hospitals but needs a batch of patients from the new
  center, and is flagged in run.json and the report. 'combat' is transductive too: the
  radiomics of every other center are ComBat-mapped onto the development center's
  (`combat.combat_to_reference`; the development center's values unchanged, its reference
  from `combat_reference`); slide and deep MRI features are left as they are.
  """
  mode = harmonise_mode(data_config)
  if mode == 'combat':
    from moemil_jax import combat

    if len(set(map(str, cohort.center))) == 1:
      logging.warning(
        'data.harmonise=combat on a store of one center (%s): nothing is harmonised. Training '
        'on it is fine; to score a new center, put its patients in a store with the development '
        "center's (ComBat maps a center onto the reference with both present)",
        cohort.center[0],
      )
    cohort.radiomics = combat.combat_to_reference(
      cohort.radiomics,
      cohort.center,
      combat_reference(data_config, cohort.center),
      min_patients=int(data_config.get('min_center_patients', 20)),
    )
    return mode
  if mode != 'per_center':
    return mode
  minimum = int(data_config.get('min_center_patients', 20))
  centers, counts = np.unique(cohort.center, return_counts=True)
  for center, n in zip(centers, counts):
    if n < minimum:
      raise ValueError(
        f'data.harmonise=per_center: center {center!r} has {n} patients, fewer than '
        f'data.min_center_patients={minimum}; its statistics would be noise: use '
        "data.harmonise='reference' or more patients"
      )
  harmonise_centers(cohort)
  return mode


def harmonise_centers(cohort: Cohort, chunk: int = 65536) -> Cohort:
  """Standardises every feature within each center (in place): a simple site harmonisation.

  Scanners and staining differ between hospitals, which shifts every image feature of a
  center. Z-scoring each center's features with that center's own statistics (no labels
  are used, so the external test center may take part) removes the location and scale part
  of that shift, as ComBat does without its empirical-Bayes shrinkage. It also removes true
  case-mix differences between centers: use it when centers treat similar populations.
  """
  for center in np.unique(cohort.center):
    rows = cohort.center == center
    patch_rows = _read_patch_rows(cohort, rows)
    if cohort.bags_partitioned or len(patch_rows):  # every process joins the sums
      mean, std = _mean_std(
        cohort.patches[patch_rows], chunk, all_processes=cohort.bags_partitioned
      )
      for start in range(0, len(patch_rows), chunk):
        block = patch_rows[start : start + chunk]
        cohort.patches[block] = ((cohort.patches[block] - mean) / std).astype(np.float16)
        if cohort.patch_views is not None:  # the stain views, with the original's statistics
          views = cohort.patch_views[:, block]
          cohort.patch_views[:, block] = ((views - mean) / std).astype(np.float16)
    d_mean, d_std = masked_mean_std(cohort.mri_deep, rows, cohort.mri_deep_count)
    cohort.mri_deep[rows] = (cohort.mri_deep[rows] - d_mean) / d_std
    rad = cohort.radiomics.loc[rows]
    cohort.radiomics.loc[rows] = (rad - rad.mean()) / rad.std(ddof=0).where(
      lambda v: v > 1e-12, 1.0
    )
  cohort.mri_deep *= (np.arange(cohort.mri_deep.shape[1])[None] < cohort.mri_deep_count[:, None])[
    ..., None
  ]
  logging.info('features standardised within each center: %s', sorted(set(cohort.center)))
  return cohort
