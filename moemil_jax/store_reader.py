"""Reading a feature store into host arrays: one row per patient, every slide in one bag.

The store is read once (clinical table, slide bags, radiomics, deep MRI features); all
slides of a patient are concatenated, in slide-id order, into one bag. A data-parallel
process can read only the bags its own devices will hold (`load_store(bags_to_read=...)`).
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from absl import logging

from feature_store import store


@dataclasses.dataclass
class Cohort:
  """Host arrays, one row per patient (clinical.parquet order)."""

  patient_id: np.ndarray  # (P,) str
  center: np.ndarray  # (P,) str
  response: np.ndarray  # (P,) float, NaN when unknown
  os_months: np.ndarray  # (P,) float, NaN when unknown
  os_event: np.ndarray  # (P,) int
  patches: np.ndarray  # (total, D) float16, bags back to back; D is the slide encoder's width
  patch_offset: np.ndarray  # (P,) int64 into patches; -1 for bags not read (see load_store)
  patch_count: np.ndarray  # (P,) int64
  radiomics: pd.DataFrame  # (P, F) float64 wide: "<sequence>:<feature>"; NaN rows w/o MRI
  mri_deep: np.ndarray  # (P, S, 2048) float32, zero padded
  mri_deep_count: np.ndarray  # (P,) int64
  split: np.ndarray | None = None  # (P,) str in SPLITS
  bags_partitioned: bool = False  # each process read only some bags (statistics span processes)
  # (K, total, D) float16: the stain views 1..K of every patch, laid out as `patches` (the
  # original is view 0); None unless load_store(stain_views=K) (docs/stain.md).
  patch_views: np.ndarray | None = None

  @property
  def num_patients(self) -> int:
    return len(self.patient_id)

  @property
  def has_radiomics(self) -> np.ndarray:
    return self.radiomics.notna().any(axis=1).to_numpy()


def _read_clinical(path: Path) -> pd.DataFrame:
  if not path.exists():
    folder = path.parent
    what = 'no such folder' if not folder.exists() else f'no {path.name} in it'
    raise store.StoreError(
      f'{folder}: not a feature store ({what}); make one with launch.extract '
      '--manifest=... --store=DIR (or launch.synth --kind=store), or check --store'
    )
  try:
    df = pq.read_table(path).to_pandas()
  except (OSError, ValueError) as e:
    raise store.StoreError(f'{path}: unreadable Parquet file, corrupt or truncated ({e})') from e
  missing = sorted(set(store.CLINICAL_COLUMNS) - set(df.columns))
  if missing:
    raise store.StoreError(f'{path}: missing columns {missing}')
  if df['patient_id'].duplicated().any():
    dup = df.loc[df['patient_id'].duplicated(), 'patient_id'].iloc[0]
    raise store.StoreError(f'{path}: patient_id {dup!r} appears more than once')
  for row, center in enumerate(df['center']):
    try:
      store.validate_id(center, what='center')
    except ValueError as e:
      raise store.StoreError(f'{path}: row {row}: {e}') from None
  resp = df['ic_response']
  if not resp.dropna().isin([0, 1]).all():
    raise store.StoreError(f'{path}: ic_response must be 0, 1 or null')
  return df.reset_index(drop=True)


def read_centers(store_dir: str | Path) -> np.ndarray:
  """Every patient's center, from clinical.parquet alone (validated as load_store does)."""
  return _read_clinical(Path(store_dir) / store.CLINICAL)['center'].astype(str).to_numpy()


def store_views(info: dict) -> int:
  """The stain views per patch a store holds (its STORE.json's slide fingerprint)."""
  fp = (info.get('wsi') or {}).get('fingerprint') or {}
  return int((fp.get('stain_augment') or {}).get('views', 0))


def load_store(
  store_dir: str | Path,
  *,
  bags_to_read: Callable[[np.ndarray], np.ndarray] | None = None,
  stain_views: int = 0,
) -> Cohort:
  """Reads clinical, WSI bags, radiomics and deep MRI features into host arrays.

  bags_to_read: given every patient's patch count (read from the slide files' footers and
  patient column only), returns the (P,) mask of patients whose patch embeddings to read.
  A data-parallel process passes the patients its own devices hold, so that the slides
  (the bulk of a store) are read once across processes; unread bags keep their
  `patch_count` and get `patch_offset` -1. The per-patient tables are read whole.
  stain_views: also read the first K stain views of every patch read (`Cohort.patch_views`);
  0 reads none, whether the store holds any or not.
  """
  root = Path(store_dir)
  info = store.read_store_json(root)
  stain_views = int(stain_views or 0)
  if stain_views > store_views(info):
    raise store.StoreError(
      f'{root}: data.stain_views={stain_views}, but the store holds {store_views(info)} stain '
      f'views per patch; extract it with --stain_augment={stain_views} (launch.extract '
      '--overwrite re-extracts the slides only) or lower data.stain_views'
    )
  clinical = _read_clinical(root / store.CLINICAL)
  ids = clinical['patient_id'].astype(str).to_numpy()
  index = {pid: i for i, pid in enumerate(ids)}
  wsi_dim = int(info.get('encoder', {}).get('dim', store.WSI_DIM))
  wsi_sha = info.get('wsi', {}).get('fingerprint_sha256')  # extracted stores; synthetic: none

  # Plan from the footers (patient, rows), then read every wanted file in parallel straight
  # into its slot of one preallocated array: one copy from the Arrow buffer, no concatenation.
  files = store.slide_files(root)
  with ThreadPoolExecutor(_file_threads()) as pool:
    heads = list(pool.map(store.slide_patient_and_rows, files))
  orphans = sorted({pid for pid, _ in heads if pid not in index})
  all_counts = np.zeros(len(ids), np.int64)
  for pid, rows in heads:
    if pid in index:
      all_counts[index[pid]] += rows
  wanted = None if bags_to_read is None else np.asarray(bags_to_read(all_counts), bool)
  read = [
    (path, index[pid], rows)
    for path, (pid, rows) in zip(files, heads)
    if pid in index and (wanted is None or wanted[index[pid]])
  ]
  counts = all_counts if wanted is None else np.where(wanted, all_counts, 0)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  patches = np.empty((int(counts.sum()), wsi_dim), np.float16)
  views = np.empty((stain_views, len(patches), wsi_dim), np.float16) if stain_views else None
  cursor = offsets.copy()
  jobs = []  # slides of a patient stay in slide-id order (files are sorted)
  for path, i, rows in read:
    jobs.append((path, int(cursor[i]), rows))
    cursor[i] += rows

  def fill(job) -> None:
    path, start, rows = job
    emb, meta = store.read_slide_embeddings(path, expected_dim=wsi_dim)
    if len(emb) != rows:
      raise store.StoreError(f'{path}: changed while the store was being read')
    if wsi_sha and meta.get('fingerprint_sha256') != wsi_sha:
      raise store.StoreError(
        f'{path}: made with encoder fingerprint {meta.get("fingerprint_sha256")}, '
        f"but the store's is {wsi_sha}: features from another extraction cannot be mixed; "
        're-extract this slide into the store'
      )
    patches[start : start + rows] = emb
    if views is not None:
      views[:, start : start + rows] = store.read_slide_views(
        path, stain_views, expected_dim=wsi_dim
      )

  with ThreadPoolExecutor(_file_threads()) as pool:
    list(pool.map(fill, jobs))
  if orphans:
    logging.warning(
      'store %s: slide files of %d patient(s) not in clinical.parquet (%s) are ignored: no '
      'longer in the manifest? `launch.extract --prune` removes them',
      root,
      len(orphans),
      ', '.join(orphans[:5]) + (', ...' if len(orphans) > 5 else ''),
    )
  if wanted is not None:
    counts, offsets = all_counts, np.where(wanted, offsets, -1)
  logging.info(
    'store %s: %d patients, %d slides read, %d patches', root, len(ids), len(read), len(patches)
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
    patch_views=views,
  )


def _file_threads() -> int:
  """Files read at once. pyarrow already decodes each file on its own thread pool: on 2
  cores one file at a time is fastest (1.7 vs 1.0 GB/s with two, measured); more files
  in flight pay off only with more cores (and on network disks)."""
  return max(1, (os.cpu_count() or 1) // 4)


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
  emb = store.embeddings_from_column(table.column('embedding'), path).astype(np.float32, copy=False)
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
