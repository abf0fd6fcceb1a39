"""From a feature store to device-resident arrays and bucketed batches.

The store is read once into host arrays (one row per patient, all slides of a patient
concatenated into one bag), split by patient, normalised with statistics fitted on the
training patients only, and put on the device once. A training step then only receives a
few small index arrays; every bag size is padded to one of a few buckets so the number of
compiled programs stays small.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from absl import logging

from feature_store import store
from moemil_jax import parallel

SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass
class Cohort:
  """Host arrays, one row per patient (clinical.parquet order)."""

  patient_id: np.ndarray  # (P,) str
  center: np.ndarray  # (P,) str
  response: np.ndarray  # (P,) float, NaN when unknown
  os_months: np.ndarray  # (P,) float, NaN when unknown
  os_event: np.ndarray  # (P,) int
  patches: np.ndarray  # (total, 1024) float16, bags back to back
  patch_offset: np.ndarray  # (P,) int64 into patches; -1 for bags not read (see load_store)
  patch_count: np.ndarray  # (P,) int64
  radiomics: pd.DataFrame  # (P, F) float64 wide: "<sequence>:<feature>"; NaN rows w/o MRI
  mri_deep: np.ndarray  # (P, S, 2048) float32, zero padded
  mri_deep_count: np.ndarray  # (P,) int64
  split: np.ndarray | None = None  # (P,) str in SPLITS
  bags_partitioned: bool = False  # each process read only some bags (statistics span processes)

  @property
  def num_patients(self) -> int:
    return len(self.patient_id)

  @property
  def has_radiomics(self) -> np.ndarray:
    return self.radiomics.notna().any(axis=1).to_numpy()


def _read_clinical(path: Path) -> pd.DataFrame:
  if not path.exists():
    raise store.StoreError(f'{path}: not found')
  df = pq.read_table(path).to_pandas()
  missing = sorted(set(store.CLINICAL_COLUMNS) - set(df.columns))
  if missing:
    raise store.StoreError(f'{path}: missing columns {missing}')
  if df['patient_id'].duplicated().any():
    dup = df.loc[df['patient_id'].duplicated(), 'patient_id'].iloc[0]
    raise store.StoreError(f'{path}: patient_id {dup!r} appears more than once')
  bad = ~df['center'].isin(['A', 'B'])
  if bad.any():
    row = int(np.flatnonzero(bad)[0])
    raise store.StoreError(
      f"{path}: row {row} has center {df['center'].iloc[row]!r}, expected 'A' or 'B'"
    )
  resp = df['ic_response']
  if not resp.dropna().isin([0, 1]).all():
    raise store.StoreError(f'{path}: ic_response must be 0, 1 or null')
  return df.reset_index(drop=True)


def load_store(
  store_dir: str | Path, *, bags_to_read: Callable[[np.ndarray], np.ndarray] | None = None
) -> Cohort:
  """Reads clinical, WSI bags, radiomics and deep MRI features into host arrays.

  bags_to_read: given every patient's patch count (read from the slide files' footers and
  patient column only), returns the (P,) mask of patients whose patch embeddings to read.
  A data-parallel process passes the patients its own devices hold, so that the slides
  (the bulk of a store) are read once across processes; unread bags keep their
  `patch_count` and get `patch_offset` -1. The per-patient tables are read whole.
  """
  root = Path(store_dir)
  info = store.read_store_json(root)
  clinical = _read_clinical(root / store.CLINICAL)
  ids = clinical['patient_id'].astype(str).to_numpy()
  index = {pid: i for i, pid in enumerate(ids)}
  wsi_dim = int(info.get('encoder', {}).get('dim', store.WSI_DIM))
  wsi_sha = info.get('wsi', {}).get('fingerprint_sha256')  # extracted stores; synthetic: none

  files = store.slide_files(root)
  wanted = None
  if bags_to_read is not None:
    slide_patients = [store.slide_patient_and_rows(path) for path in files]
    all_counts = np.zeros(len(ids), np.int64)
    for path, (pid, rows) in zip(files, slide_patients):
      if rows and pid not in index:
        raise store.StoreError(f'{path}: patient_id {pid!r} not in clinical.parquet')
      if pid in index:
        all_counts[index[pid]] += rows
    wanted = np.asarray(bags_to_read(all_counts), bool)
    files = [
      path for path, (pid, _) in zip(files, slide_patients) if pid in index and wanted[index[pid]]
    ]

  # WSI: all slides of a patient form one bag, in slide-id order.
  per_patient: list[list[np.ndarray]] = [[] for _ in ids]
  for path in files:
    bag = store.read_slide(path, expected_dim=wsi_dim)
    if wsi_sha and bag.metadata.get('fingerprint_sha256') != wsi_sha:
      raise store.StoreError(
        f'{path}: made with encoder fingerprint {bag.metadata.get("fingerprint_sha256")}, '
        f"but the store's is {wsi_sha}: features from another extraction cannot be mixed; "
        're-extract this slide into the store'
      )
    if bag.patient_id not in index:
      if len(bag.embeddings):
        raise store.StoreError(f'{path}: patient_id {bag.patient_id!r} not in clinical.parquet')
      continue
    per_patient[index[bag.patient_id]].append(bag.embeddings)
  counts = np.array([sum(len(e) for e in bags) for bags in per_patient], np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  patches = np.zeros((int(counts.sum()), wsi_dim), np.float16)
  for i, bags in enumerate(per_patient):
    if bags:
      patches[offsets[i] : offsets[i] + counts[i]] = np.concatenate(bags)
  if wanted is not None:
    if not np.array_equal(counts[wanted], all_counts[wanted]):
      raise store.StoreError(f'{root}/{store.WSI_DIR}: slide files changed while being read')
    counts, offsets = all_counts, np.where(wanted, offsets, -1)
  logging.info(
    'store %s: %d patients, %d slides read, %d patches', root, len(ids), len(files), len(patches)
  )

  radiomics = _read_radiomics(root / store.RADIOMICS, ids)
  mri_deep, mri_count = _read_mri_deep(root / store.MRI_DEEP, index)
  surv_known = clinical['os_months'].notna() & clinical['os_event'].notna()
  return Cohort(
    patient_id=ids,
    center=clinical['center'].astype(str).to_numpy(),
    response=clinical['ic_response'].astype('Float64').to_numpy(np.float64, na_value=np.nan),
    os_months=np.where(
      surv_known,
      clinical['os_months'].astype('Float64').to_numpy(np.float64, na_value=np.nan),
      np.nan,
    ),
    os_event=clinical['os_event'].fillna(0).astype(np.int64).to_numpy(),
    patches=patches,
    patch_offset=offsets,
    patch_count=counts,
    radiomics=radiomics,
    mri_deep=mri_deep,
    mri_deep_count=mri_count,
    bags_partitioned=wanted is not None,
  )


def _read_radiomics(path: Path, ids: np.ndarray) -> pd.DataFrame:
  if not path.exists():
    logging.warning('%s: not found; no radiomics features', path)
    return pd.DataFrame(index=ids)
  df = pq.read_table(path).to_pandas()
  for col in ('patient_id', 'sequence'):
    if col not in df.columns:
      raise store.StoreError(f'{path}: missing column {col!r}')
  feats = [c for c in df.columns if c not in ('patient_id', 'sequence')]
  wide = df.pivot_table(
    index='patient_id', columns='sequence', values=feats, aggfunc='first', dropna=False
  )
  wide.columns = [f'{seq}:{feat}' for feat, seq in wide.columns]
  wide = wide[sorted(wide.columns)]
  return wide.reindex(ids).astype(np.float64)


def _read_mri_deep(path: Path, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
  n = len(index)
  if not path.exists():
    logging.warning('%s: not found; no deep MRI features', path)
    return np.zeros((n, 1, store.MRI_DEEP_DIM), np.float32), np.zeros(n, np.int64)
  table = pq.read_table(path)
  emb = store.embeddings_from_column(table.column('embedding'), path).astype(np.float32)
  meta = table.select(['patient_id', 'sequence', 'slice_index']).to_pandas()
  seq_rank = {s: i for i, s in enumerate(store.MRI_SEQUENCES)}
  meta['seq_rank'] = meta['sequence'].map(lambda s: seq_rank.get(s, len(seq_rank)))
  meta['row'] = np.arange(len(meta))
  unknown = set(meta['patient_id']) - set(index)
  if unknown:
    raise store.StoreError(f'{path}: patient_id {sorted(unknown)[0]!r} not in clinical.parquet')
  meta = meta.sort_values(['patient_id', 'seq_rank', 'sequence', 'slice_index'], kind='stable')
  counts = np.zeros(n, np.int64)
  groups = meta.groupby('patient_id', sort=False)['row']
  for pid, rows in groups:
    counts[index[pid]] = len(rows)
  out = np.zeros((n, max(int(counts.max(initial=0)), 1), emb.shape[1]), np.float32)
  for pid, rows in groups:
    out[index[pid], : len(rows)] = emb[rows.to_numpy()]
  return out, counts


# --------------------------------------------------------------------------- splits


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


# --------------------------------------------------------------------------- preprocessing


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
    x = wide[self.columns].to_numpy(np.float64)
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
  under resampling and survival-aware), and/or an L1 logistic regression on response
  (`lasso`; on ~200 patients its selection swings from 3 to 545 columns between folds).
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
    keep = _lasso_select(z, keep, response[rows], lasso_cs, seed)
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


# --------------------------------------------------------------------------- device data


@dataclasses.dataclass
class DeviceData:
  """Everything a step needs, resident on the device; batches only carry indices."""

  patches: jax.Array  # (total + 1, 1024) float16; last row is a zero pad
  patch_mean: jax.Array  # (1024,) float32
  patch_inv_std: jax.Array  # (1024,) float32
  radiomics: jax.Array  # (P, F) float32 (z-scored, 0 where missing)
  has_radiomics: jax.Array  # (P,) bool
  mri_deep: jax.Array  # (P, S, 2048) float32 (z-scored)
  mri_deep_count: jax.Array  # (P,) int32
  response: jax.Array  # (P,) float32 (0 where unknown)
  has_response: jax.Array  # (P,) bool
  os_months: jax.Array  # (P,) float32
  os_event: jax.Array  # (P,) int32
  has_survival: jax.Array  # (P,) bool
  radiomics_columns: list[str]

  def tree(self) -> dict[str, jax.Array]:
    return {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if f.name != 'radiomics_columns'
    }


def _warn_degenerate_labels(cohort: Cohort, train: np.ndarray) -> None:
  """Says when a training split cannot teach a task; training still runs (the loss is 0 or
  one-sided) so that a multi-task model can learn the other task."""
  events = int(cohort.os_event[train & ~np.isnan(cohort.os_months)].sum())
  if events == 0:
    logging.warning(
      'training split: no OS events (%d patients, all censored or OS unknown); '
      'the survival loss is 0 and the risk head is untrained',
      int(train.sum()),
    )
  labels = cohort.response[train]
  classes = np.unique(labels[~np.isnan(labels)]).astype(int).tolist()
  if len(classes) < 2:
    logging.warning(
      'training split: IC response has %s (%d labelled patients); the response head '
      'cannot learn to separate classes',
      f'only class {classes}' if classes else 'no labels',
      int((~np.isnan(labels)).sum()),
    )


def prepare(
  cohort: Cohort,
  data_config,
  *,
  seed: int = 0,
  device=None,
  layout: BagLayout | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> DeviceData:
  """Fits preprocessing on cohort.split == 'train' and puts the arrays on the device.

  Without a mesh everything goes to `device`. With one, the per-patient arrays are
  replicated and the patches are split in `layout.groups` blocks along the data axis, each
  built by the process that owns its device from the bags that process read.
  """
  layout = layout or bag_layout(cohort.patch_count)
  if cohort.split is None:
    raise ValueError('prepare() needs cohort.split; call assign_splits first')
  train = cohort.split == 'train'
  _warn_degenerate_labels(cohort, train)
  sel = fit_radiomics(
    cohort.radiomics,
    train,
    cohort.response,
    corr_threshold=data_config.radiomics_corr_threshold,
    lasso=data_config.radiomics_lasso,
    lasso_cs=data_config.radiomics_lasso_cs,
    seed=seed,
    transform=data_config.get('radiomics_transform', 'zscore'),
    min_present=data_config.get('radiomics_min_present', 0.5),
    top_k=data_config.get('radiomics_top_k', 0),
    os_months=cohort.os_months,
    os_event=cohort.os_event,
  )
  rad = (
    sel.transform(cohort.radiomics)
    if len(cohort.radiomics.columns)
    else np.zeros((cohort.num_patients, 1), np.float32)
  )
  has_rad = cohort.has_radiomics & (len(sel.columns) > 0)
  rad[~has_rad] = 0.0

  d_mean, d_std = masked_mean_std(cohort.mri_deep, train, cohort.mri_deep_count)
  deep = ((cohort.mri_deep - d_mean) / d_std).astype(np.float32)
  deep *= (np.arange(deep.shape[1])[None] < cohort.mri_deep_count[:, None])[..., None]

  p_mean, p_std = _mean_std(
    cohort.patches[_read_patch_rows(cohort, train)], all_processes=cohort.bags_partitioned
  )

  surv = ~np.isnan(cohort.os_months)
  if mesh is not None:
    device = parallel.replicated(mesh)

  def put(x):
    return jax.device_put(x, device)

  return DeviceData(
    patches=_device_patches(cohort, layout, device, mesh),
    patch_mean=put(p_mean.astype(np.float32)),
    patch_inv_std=put((1.0 / p_std).astype(np.float32)),
    radiomics=put(rad),
    has_radiomics=put(has_rad),
    mri_deep=put(deep),
    mri_deep_count=put(cohort.mri_deep_count.astype(np.int32)),
    response=put(np.nan_to_num(cohort.response).astype(np.float32)),
    has_response=put(~np.isnan(cohort.response)),
    os_months=put(np.nan_to_num(cohort.os_months).astype(np.float32)),
    os_event=put(cohort.os_event.astype(np.int32)),
    has_survival=put(surv),
    radiomics_columns=sel.columns,
  )


# --------------------------------------------------------------------------- bag layout


@dataclasses.dataclass(frozen=True)
class BagLayout:
  """Where every bag lives in `DeviceData.patches`.

  The patches array is `groups` blocks of `rows` rows, one block per device of the data
  axis; each block ends in a zero row that padding points at. Patient p's bag is in block
  `group[p]`, from the global row `offset[p]`. Batches put a group's patients in that
  group's rows, so with a mesh each device gathers only from its own block. One group is
  the single-device layout: bags back to back in patient order, then one zero row.
  """

  group: np.ndarray  # (P,) int32
  offset: np.ndarray  # (P,) int64, global row of the bag's first patch
  rows: int  # rows per block, zero pad row included
  groups: int

  def pad_row(self, g: int) -> int:
    return (g + 1) * self.rows - 1


def bag_layout(counts: np.ndarray, groups: int = 1) -> BagLayout:
  """Deals patients to groups (snake order by bag size: equal patient numbers, similar
  patch totals), then places each group's bags in patient order."""
  counts = np.asarray(counts, np.int64)
  if groups < 1:
    raise ValueError(f'bag groups must be >= 1, got {groups}')
  by_size = np.argsort(-counts, kind='stable')
  lap, pos = np.divmod(np.arange(len(counts)), groups)
  group = np.empty(len(counts), np.int32)
  group[by_size] = np.where(lap % 2 == 0, pos, groups - 1 - pos)
  totals = np.bincount(group, weights=counts, minlength=groups).astype(np.int64)
  rows = int(totals.max(initial=0)) + 1
  offset = np.zeros(len(counts), np.int64)
  for g in range(groups):
    members = np.flatnonzero(group == g)
    offset[members] = g * rows + np.concatenate([[0], np.cumsum(counts[members])[:-1]])
  return BagLayout(group, offset, rows, groups)


def _bag_block(cohort: Cohort, layout: BagLayout, g: int) -> np.ndarray:
  block = np.zeros((layout.rows, cohort.patches.shape[1]), np.float16)
  for p in np.flatnonzero((layout.group == g) & (cohort.patch_count > 0)):
    o, c = cohort.patch_offset[p], cohort.patch_count[p]
    if o < 0:
      raise ValueError(
        f'patient {cohort.patient_id[p]}: bag not read by process '
        f'{jax.process_index()}, whose device holds group {g}'
      )
    start = layout.offset[p] - g * layout.rows
    block[start : start + c] = cohort.patches[o : o + c]
  return block


def _device_patches(cohort: Cohort, layout: BagLayout, device, mesh) -> jax.Array:
  if mesh is None:
    return jax.device_put(
      np.concatenate([_bag_block(cohort, layout, g) for g in range(layout.groups)]), device
    )
  if mesh.shape[parallel.DATA] != layout.groups:
    raise ValueError(
      f"bag layout has {layout.groups} groups, the mesh's data axis "
      f'{mesh.shape[parallel.DATA]} devices'
    )
  shape = (layout.groups * layout.rows, cohort.patches.shape[1])
  return jax.make_array_from_callback(
    shape,
    parallel.batch_sharded(mesh),
    lambda index: _bag_block(cohort, layout, (index[0].start or 0) // layout.rows),
  )


# --------------------------------------------------------------------------- batches


def bucket_size(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= n; beyond the largest, the next multiple of it."""
  buckets = sorted(buckets)
  for b in buckets:
    if n <= b:
      return b
  return int(-(-n // buckets[-1]) * buckets[-1])


@dataclasses.dataclass
class Batch:
  """Host index arrays for one step (B patients, N patch slots). With G bag groups, rows
  [g B/G, (g+1) B/G) hold group g's patients; unused rows are masked."""

  patient: np.ndarray  # (B,) int32, 0 for padding rows
  patient_mask: np.ndarray  # (B,) bool
  patch_index: np.ndarray  # (B, N) int32 into DeviceData.patches (pad row for padding)
  patch_valid: np.ndarray  # (B, N) bool

  def tree(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


def _rows_per_group(batch_size: int, layout: BagLayout) -> int:
  if batch_size % layout.groups:
    raise ValueError(
      f'batch size {batch_size} is not divisible by {layout.groups} bag groups '
      '(devices on the data axis); pick a multiple'
    )
  return batch_size // layout.groups


def _make_batch(parts, counts, layout, batch_size, buckets, cap, rng):
  """parts[g]: the patients of group g in this batch."""
  b = _rows_per_group(batch_size, layout)
  takes = [
    np.array([min(counts[p], cap) if cap else counts[p] for p in members], np.int64)
    for members in parts
  ]
  n = bucket_size(max([int(t.max(initial=0)) for t in takes] + [1]), buckets)
  index = np.empty((batch_size, n), np.int32)
  valid = np.zeros((batch_size, n), bool)
  patient = np.zeros(batch_size, np.int32)
  mask = np.zeros(batch_size, bool)
  for g, (members, take) in enumerate(zip(parts, takes)):
    index[g * b : (g + 1) * b] = layout.pad_row(g)
    for j, (p, t) in enumerate(zip(members, take)):
      row = g * b + j
      if t < counts[p]:
        chosen = np.sort(rng.choice(counts[p], size=t, replace=False))
      else:
        chosen = np.arange(t)
      index[row, :t] = layout.offset[p] + chosen
      valid[row, :t] = True
      patient[row], mask[row] = p, True
  return Batch(patient, mask, index, valid)


def _group_chunks(order: np.ndarray, layout: BagLayout, b: int) -> list[list[np.ndarray]]:
  """Per group, its patients (in `order`) cut into chunks of b."""
  per_group = [order[layout.group[order] == g] for g in range(layout.groups)]
  return [[m[i : i + b] for i in range(0, len(m), b)] for m in per_group]


def _zip_chunks(chunks: list[list[np.ndarray]], steps: Sequence[int]) -> list[list[np.ndarray]]:
  empty = np.zeros(0, np.int64)
  return [[c[k] if k < len(c) else empty for c in chunks] for k in steps]


def train_batches(
  patients: np.ndarray,
  counts: np.ndarray,
  layout: BagLayout,
  *,
  batch_size: int,
  buckets: Sequence[int],
  max_patches: int,
  rng: np.random.Generator,
) -> list[Batch]:
  """One epoch: patients of similar bag size share a batch (sizes jittered so batches
  change between epochs), batches shuffled; bags above `max_patches` randomly subsampled."""
  patients = np.asarray(patients)
  size = np.minimum(counts[patients], max_patches) if max_patches else counts[patients]
  jitter = np.exp(rng.normal(0.0, 0.15, len(patients)))  # ~15%: batches vary, padding stays low
  order = patients[np.argsort((size + 1) * jitter, kind='stable')]
  chunks = _group_chunks(order, layout, _rows_per_group(batch_size, layout))
  steps = max(len(c) for c in chunks)
  return [
    _make_batch(parts, counts, layout, batch_size, buckets, max_patches, rng)
    for parts in _zip_chunks(chunks, rng.permutation(steps))
  ]


def eval_batches(
  patients: np.ndarray,
  counts: np.ndarray,
  layout: BagLayout,
  *,
  batch_size: int,
  buckets: Sequence[int],
  max_patches: int = 0,
  seed: int = 0,
) -> list[Batch]:
  """Deterministic batches sorted by bag size (whole bags unless `max_patches`)."""
  patients = np.asarray(patients)
  order = patients[np.argsort(counts[patients], kind='stable')]
  chunks = _group_chunks(order, layout, _rows_per_group(batch_size, layout))
  rng = np.random.default_rng(seed)
  return [
    _make_batch(parts, counts, layout, batch_size, buckets, max_patches, rng)
    for parts in _zip_chunks(chunks, range(max(len(c) for c in chunks)))
  ]


def batch_shapes(batches: Sequence[Batch]) -> set[tuple[int, int]]:
  return {b.patch_index.shape for b in batches}


def gather_inputs(
  data: dict[str, jax.Array],
  batch: dict[str, jax.Array],
  compute_dtype,
  mesh: jax.sharding.Mesh | None = None,
):
  """Inside jit: model inputs and targets of one batch from the resident arrays."""
  p = batch['patient']
  wsi = parallel.gather_local_rows(data['patches'], batch['patch_index'], mesh)
  wsi = wsi.astype(jnp.float32)
  wsi = ((wsi - data['patch_mean']) * data['patch_inv_std']).astype(compute_dtype)
  s = data['mri_deep'].shape[1]
  deep_count = data['mri_deep_count'][p]
  pmask = batch['patient_mask']
  inputs = {
    'wsi': wsi,
    'wsi_valid': batch['patch_valid'],
    'has_wsi': jnp.any(batch['patch_valid'], -1) & pmask,
    'radiomics': data['radiomics'][p],
    'has_radiomics': data['has_radiomics'][p] & pmask,
    'mri_deep': data['mri_deep'][p].astype(compute_dtype),
    'mri_deep_valid': jnp.arange(s)[None] < deep_count[:, None],
    'has_mri_deep': (deep_count > 0) & pmask,
  }
  targets = {
    'patient_mask': pmask,
    'response': data['response'][p],
    'has_response': data['has_response'][p],
    'os_months': data['os_months'][p],
    'os_event': data['os_event'][p],
    'has_survival': data['has_survival'][p],
  }
  return inputs, targets


def iterate(batches: Sequence[Batch]) -> Iterator[dict[str, np.ndarray]]:
  for b in batches:
    yield b.tree()
