"""A synthetic feature store written directly, without images.

ResNet50 runs about 3 patches/s on a small CPU, so tests, benchmarks and
validity checks at the paper's scale (404 patients, bags of ~2,000 patches) use
this instead of extraction. The files follow the same contract as real
extraction (`feature_store.store`). Embeddings look like pooled ReLU features:
non-negative mixtures of a few tissue prototypes. The WSI signal lives only in
a spatially clustered set of key patches (what attention MIL must find), whose
indices are written to `truth_key_patches.parquet` for interpretation tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from absl import logging

from feature_store import store, synthetic

RADIOMICS_FEATURES = tuple(
  f'{image}_{name}'
  for image in ('original', 'log-sigma-3-0-mm-3D', 'wavelet-LLH', 'wavelet-HHL')
  for name in (
    'shape_MeshVolume',
    'shape_Sphericity',
    'shape_SurfaceVolumeRatio',
    'shape_Elongation',
    'firstorder_Mean',
    'firstorder_Entropy',
    'firstorder_Kurtosis',
    'firstorder_Skewness',
    'firstorder_90Percentile',
    'glcm_Contrast',
    'glcm_Correlation',
    'glcm_JointEntropy',
    'glcm_Idm',
    'glrlm_RunLengthNonUniformity',
    'glszm_ZoneEntropy',
    'gldm_DependenceEntropy',
    'ngtdm_Coarseness',
  )
  if not (image != 'original' and name.startswith('shape_'))  # shape exists on the original only
)


@dataclasses.dataclass(frozen=True)
class StoreShape:
  """Sizes of the synthetic store."""

  median_patches: int = 2000
  bag_sigma: float = 0.8  # lognormal spread of patches per patient
  min_patches: int = 16
  max_patches: int = 20000
  key_fraction: float = 0.08  # share of patches carrying the WSI signal
  mri_slices: int = 3  # deep-feature slices per sequence
  wsi_noise: float = 0.35
  wsi_key_gain: float = 1.2  # key-patch signal along the planted direction


class _Prototypes:
  """Fixed directions in embedding space: tissue types, the signal, the center shift."""

  def __init__(self, rng: np.random.Generator, dim: int, tissue_types: int):
    self.tissue = np.abs(rng.normal(0.0, 0.6, (tissue_types, dim))).astype(np.float32)
    self.key = np.abs(rng.normal(0.0, 0.6, dim)).astype(np.float32)
    self.signal = self._unit(rng.normal(size=dim))
    self.shift = self._unit(rng.normal(size=dim))

  @staticmethod
  def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _grid_coordinates(
  rng: np.random.Generator, n: int, n_key: int, step: int
) -> tuple[np.ndarray, np.ndarray]:
  """n distinct grid cells of a roughly round tissue region; the n_key nearest a random focus are key."""
  side = int(np.ceil(np.sqrt(n / 0.6))) + 2
  cells = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing='ij'), -1).reshape(-1, 2)
  centre = (side - 1) / 2
  radius = np.hypot(cells[:, 0] - centre, cells[:, 1] - centre)
  cells = cells[np.argsort(radius + rng.random(len(cells)) * 0.5)[:n]]
  focus = cells[rng.integers(len(cells))]
  key = np.argsort(np.hypot(*(cells - focus).T))[:n_key]
  is_key = np.zeros(n, bool)
  is_key[key] = True
  return (cells * step).astype(np.int32), is_key


def _wsi_bag(rng, protos: _Prototypes, n: int, view: float, center_b: float, shape: StoreShape):
  n_key = max(1, int(round(n * shape.key_fraction)))
  xy, is_key = _grid_coordinates(rng, n, n_key, step=512)
  tissue = protos.tissue[rng.integers(len(protos.tissue), size=n)]
  emb = tissue + shape.wsi_noise * rng.standard_normal((n, tissue.shape[1]), dtype=np.float32)
  emb[is_key] = (
    protos.key
    + shape.wsi_noise * rng.standard_normal((n_key, tissue.shape[1]), dtype=np.float32)
    + shape.wsi_key_gain * view * protos.signal
  )
  emb += 0.25 * center_b * protos.shift
  np.maximum(emb, 0.0, out=emb)
  return xy, emb, is_key


def make_store(
  out_dir: str | Path,
  *,
  patients: int = 404,
  seed: int = 0,
  knobs: synthetic.Knobs = synthetic.Knobs(),
  shape: StoreShape = StoreShape(),
  **shape_overrides,
) -> Path:
  """Writes a complete feature store (plus truth.csv) into out_dir and returns its path."""
  shape = dataclasses.replace(shape, **shape_overrides)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  frame = synthetic.sample_patients(patients, seed, knobs)
  rng = np.random.default_rng([seed, 1])
  wsi = _Prototypes(rng, store.WSI_DIM, tissue_types=6)
  mri = _Prototypes(rng, store.MRI_DEEP_DIM, tissue_types=len(store.MRI_SEQUENCES))
  radiomics_loadings = rng.normal(0, 1, len(RADIOMICS_FEATURES)) * (
    rng.random(len(RADIOMICS_FEATURES)) < 0.3
  )
  radiomics_scale = np.exp(rng.normal(0, 2, len(RADIOMICS_FEATURES)))

  sizes = np.exp(rng.normal(np.log(shape.median_patches), shape.bag_sigma, patients))
  sizes = np.clip(np.round(sizes), shape.min_patches, shape.max_patches).astype(int)
  encoder = {
    'name': 'synthetic',
    'dim': store.WSI_DIM,
    'target_mpp': 0.5,
    'patch_px': 256,
    'weights': 'synthetic',
    'weights_sha256': None,
  }
  key_rows, rad_rows = [], []
  deep_pid, deep_seq, deep_slice, deep_emb = [], [], [], []
  total_patches = 0
  for i, row in enumerate(frame.itertuples(index=False)):
    prng = np.random.default_rng([seed, 2, i])
    center_b = knobs.center_shift if row.center == 'B' else 0.0
    if row.has_wsi:
      xy, emb, is_key = _wsi_bag(prng, wsi, int(sizes[i]), row.wsi_view, center_b, shape)
      cuts = [0, len(xy)] if row.n_slides == 1 else [0, len(xy) // 2, len(xy)]
      for s in range(len(cuts) - 1):
        sl = slice(cuts[s], cuts[s + 1])
        slide_id = f'{row.patient_id}_s{s + 1}'
        store.write_slide(
          out,
          slide_id,
          row.patient_id,
          xy[sl],
          emb[sl],
          {'mpp': 0.5, 'synthetic': True, 'encoder': encoder},
        )
        key_rows += [(slide_id, int(j)) for j in np.flatnonzero(is_key[sl])]
      total_patches += len(xy)
    if row.has_mri:
      for s, seq in enumerate(store.MRI_SEQUENCES):
        for k in range(shape.mri_slices):
          e = (
            mri.tissue[s]
            + 0.3 * prng.standard_normal(store.MRI_DEEP_DIM)
            + 1.0 * row.mri_view * mri.signal
            + 0.25 * center_b * mri.shift
          )
          deep_pid.append(row.patient_id)
          deep_seq.append(seq)
          deep_slice.append(10 + k)
          deep_emb.append(np.maximum(e, 0.0).astype(np.float32))
        values = (
          radiomics_loadings * row.mri_view
          + prng.normal(0, 1, len(RADIOMICS_FEATURES))
          + 0.3 * center_b
        ) * radiomics_scale
        rad_rows.append(
          {
            'patient_id': row.patient_id,
            'sequence': seq,
            **dict(zip(RADIOMICS_FEATURES, values.tolist())),
          }
        )
    if (i + 1) % 50 == 0:
      logging.info('synthetic store: %d/%d patients, %d patches', i + 1, patients, total_patches)

  radiomics_meta = {'pyradiomics_version': 'synthetic', 'params': None}
  mri_encoder = {'name': 'synthetic', 'dim': store.MRI_DEEP_DIM, 'slices': shape.mri_slices}
  store.write_radiomics(out, rad_rows, radiomics_meta)
  store.write_mri_deep(
    out,
    deep_pid,
    deep_seq,
    deep_slice,
    np.stack(deep_emb) if deep_emb else np.zeros((0, store.MRI_DEEP_DIM), np.float32),
    {'encoder': mri_encoder},
  )
  store.write_clinical(out, store.clinical_table(frame))
  store.write_failures(out, [])
  store.atomic_write_table(
    pa.table(
      {'slide_id': [r[0] for r in key_rows], 'row': pa.array([r[1] for r in key_rows], pa.int32())}
    ),
    out / 'truth_key_patches.parquet',
  )
  synthetic.write_truth(frame, out / 'truth.csv')
  store.write_store_json(
    out,
    {
      'synthetic': True,
      'generator': {
        'seed': seed,
        'knobs': dataclasses.asdict(knobs),
        'shape': dataclasses.asdict(shape),
      },
      'encoder': encoder,
      'mri_encoder': mri_encoder,
      'radiomics': radiomics_meta,
      'counts': {
        'patients': patients,
        'slides': len(store.slide_files(out)),
        'patches': total_patches,
        'mri_patients': int(frame.has_mri.sum()),
      },
      'failures': 0,
    },
  )
  logging.info(
    'synthetic store written to %s: %d patients, %d patches', out, patients, total_patches
  )
  return out


def read_truth(directory: str | Path) -> pd.DataFrame:
  return pd.read_csv(Path(directory) / 'truth.csv', dtype={'patient_id': str})
