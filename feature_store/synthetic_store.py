"""A synthetic feature store written directly, without images.

ResNet50 runs about 3 patches/s on a small CPU, so tests, benchmarks and
validity checks at the paper's scale (404 patients, bags of ~2,000 patches) use
this instead of extraction. The files follow the same contract as real
extraction (`feature_store.store`). Embeddings look like pooled ReLU features:
non-negative mixtures of a few tissue prototypes. The WSI signal lives only in
a spatially clustered set of key patches (what attention MIL must find), whose
indices are written to `truth_key_patches.parquet` for interpretation tests.

Presets (`PRESETS`, `launch.synth --preset`): `clean` is the cohort the project started
with. `realistic` and `hard` add what real two-hospital NPC cohorts have (see BUILD.md,
"Stress cohorts"): hundreds of radiomics features in correlated blocks on very different
scales, some heavy-tailed, the signal in a few; a few percent of patients missing one MRI
sequence; weakly informative deep MRI features; the slide signal in 2-6% of patches beside a
decoy tissue that resembles it; a per-feature scale and offset shift at the external center
and scanner batches within each center; a few extreme outliers; and, through the knobs, a
response that needs both modalities, a nonlinear hazard and label noise.
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
  # Stress properties (off by default: the clean store).
  key_fraction_range: tuple[float, float] | None = None  # per-patient share, uniform
  decoy_fraction: float = 0.0  # share of a non-informative tissue that looks like key tissue
  mri_deep_gain: float = 1.0  # deep MRI signal along the planted direction
  mri_deep_noise: float = 0.3
  radiomics_blocks: int = 0  # > 0: realistic radiomics, blocks of correlated features
  radiomics_block_size: int = 8
  radiomics_informative_blocks: int = 2  # blocks per sequence carrying the MRI view
  radiomics_heavy_tailed: float = 0.0  # share of features that are lognormal
  missing_sequence_rate: float = 0.0  # MRI patients missing one sequence
  center_scale_sd: float = 0.0  # sd of the log per-feature scale shift of center B
  scanners_per_center: int = 1  # scanner batches within a center (offset per scanner)
  scanner_sd: float = 0.0
  outlier_rate: float = 0.0  # patients with a few extreme radiomics values


_REALISTIC_KNOBS = dict(
  two_factor=True,
  wsi_signal=0.8,
  mri_signal=0.8,
  tnm_signal=0.45,
  response_interaction=0.5,
  hazard_curvature=0.3,
  label_noise=0.05,
  center_b_response_shift=-0.4,
  missing_mri_rate=0.03,
  missing_wsi_rate=0.05,
)
_REALISTIC_SHAPE = dict(
  key_fraction_range=(0.02, 0.06),
  decoy_fraction=0.08,
  mri_deep_gain=0.35,
  mri_deep_noise=0.5,
  radiomics_blocks=12,
  radiomics_informative_blocks=2,
  radiomics_heavy_tailed=0.3,
  missing_sequence_rate=0.04,
  center_scale_sd=0.3,
  scanners_per_center=2,
  scanner_sd=0.3,
  outlier_rate=0.01,
)
PRESETS: dict[str, tuple[dict, dict]] = {
  'clean': ({}, {}),
  'realistic': (_REALISTIC_KNOBS, _REALISTIC_SHAPE),
  'hard': (
    {
      **_REALISTIC_KNOBS,
      'wsi_signal': 0.7,
      'mri_signal': 0.7,
      'label_noise': 0.1,
      'center_b_response_shift': -0.7,
      'missing_mri_rate': 0.06,
    },
    {
      **_REALISTIC_SHAPE,
      'key_fraction_range': (0.01, 0.03),
      'decoy_fraction': 0.12,
      'mri_deep_gain': 0.2,
      'radiomics_blocks': 20,
      'radiomics_informative_blocks': 1,
      'missing_sequence_rate': 0.1,
      'center_scale_sd': 0.5,
      'scanner_sd': 0.5,
      'outlier_rate': 0.02,
    },
  ),
}


def preset_config(name: str) -> tuple[synthetic.Knobs, StoreShape]:
  """The (knobs, store shape) of a named preset: clean, realistic or hard."""
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}: choose one of {sorted(PRESETS)}')
  knobs, shape = PRESETS[name]
  return synthetic.Knobs(**knobs), StoreShape(**shape)


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


def _wsi_bag(
  rng, protos: _Prototypes, n: int, view: float, center_b: float, shape: StoreShape, scale
):
  fraction = shape.key_fraction
  if shape.key_fraction_range is not None:
    fraction = rng.uniform(*shape.key_fraction_range)
  n_key = max(1, int(round(n * fraction)))
  xy, is_key = _grid_coordinates(rng, n, n_key, step=512)
  tissue = protos.tissue[rng.integers(len(protos.tissue), size=n)]
  emb = tissue + shape.wsi_noise * rng.standard_normal((n, tissue.shape[1]), dtype=np.float32)
  dim = tissue.shape[1]
  if shape.decoy_fraction > 0:  # looks like key tissue, moves along the signal at random
    decoy = np.flatnonzero(~is_key & (rng.random(n) < shape.decoy_fraction))
    emb[decoy] = (
      protos.decoy
      + shape.wsi_noise * rng.standard_normal((len(decoy), dim), dtype=np.float32)
      + shape.wsi_key_gain * rng.standard_normal() * protos.signal
    )
  emb[is_key] = (
    protos.key
    + shape.wsi_noise * rng.standard_normal((n_key, dim), dtype=np.float32)
    + shape.wsi_key_gain * view * protos.signal
  )
  emb += 0.25 * center_b * protos.shift
  if scale is not None:
    emb *= scale
  np.maximum(emb, 0.0, out=emb)
  return xy, emb, is_key


def _radiomics_names(shape: StoreShape) -> tuple[str, ...]:
  if not shape.radiomics_blocks:
    return RADIOMICS_FEATURES
  classes = ('firstorder', 'glcm', 'glrlm', 'glszm', 'gldm', 'ngtdm')
  return tuple(
    f'{image}_{classes[b % len(classes)]}_Block{b:02d}Feature{k}'
    for image in ('original', 'wavelet-LLH')
    for b in range(shape.radiomics_blocks)
    for k in range(shape.radiomics_block_size)
  )


class _RadiomicsModel:
  """Realistic radiomics: blocks of correlated features (one factor each), very different
  scales, a share lognormal; a few blocks load on the MRI view, the rest on nuisance
  factors (tumour volume, texture) shared by the sequences."""

  def __init__(self, rng, shape: StoreShape, names):
    f = len(names)
    block = np.arange(f) // shape.radiomics_block_size % shape.radiomics_blocks
    self.block = block
    self.informative = block < shape.radiomics_informative_blocks
    self.loading = rng.uniform(0.6, 0.95, f) * rng.choice([-1.0, 1.0], f)
    self.scale = np.exp(rng.normal(0, 2, f))
    self.offset = rng.normal(0, 3, f) * self.scale
    self.heavy = rng.random(f) < shape.radiomics_heavy_tailed
    self.center_scale = np.exp(rng.normal(0, shape.center_scale_sd, f))
    self.center_offset = rng.normal(0, shape.center_scale_sd, f)
    self.scanner_offset = rng.normal(0, shape.scanner_sd, (2, shape.scanners_per_center, f))
    self.blocks = shape.radiomics_blocks

  def values(self, rng, view, nuisance, center: int, scanner: int, outlier: bool, seq: int):
    factor = np.where(self.informative, view, nuisance[self.block])
    sequence_noise = 0.2 * rng.standard_normal(self.blocks)[self.block]
    z = self.loading * factor + np.sqrt(1 - self.loading**2) * rng.standard_normal(len(factor))
    z = z + sequence_noise + 0.1 * seq
    z = z + self.scanner_offset[center, scanner]
    if center:
      z = z * self.center_scale + self.center_offset
    z = np.where(self.heavy, np.exp(0.8 * z), z)
    if outlier:
      z = np.where(rng.random(len(z)) < 0.1, z * 20 + 20, z)
    return z * self.scale + self.offset


def make_store(
  out_dir: str | Path,
  *,
  patients: int = 404,
  seed: int = 0,
  knobs: synthetic.Knobs = synthetic.Knobs(),
  shape: StoreShape = StoreShape(),
  preset: str | None = None,
  **shape_overrides,
) -> Path:
  """Writes a complete feature store (plus truth.csv) into out_dir and returns its path.

  preset: 'clean', 'realistic' or 'hard' replaces `knobs` and `shape` (overrides still apply).
  """
  if preset is not None:
    knobs, shape = preset_config(preset)
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
  # Stress properties draw from their own stream, so the clean store stays as it was.
  stress = np.random.default_rng([seed, 3])
  near_key = wsi.key + np.abs(stress.normal(0.0, 0.25, store.WSI_DIM)) - 0.1
  wsi.decoy = np.maximum(near_key, 0.0).astype(np.float32)  # the decoy resembles key tissue
  wsi_center_scale = np.exp(stress.normal(0, shape.center_scale_sd, store.WSI_DIM)).astype(
    np.float32
  )
  deep_center_scale = np.exp(stress.normal(0, shape.center_scale_sd, store.MRI_DEEP_DIM))
  radiomics_names = _radiomics_names(shape)
  realistic_radiomics = (
    _RadiomicsModel(stress, shape, radiomics_names) if shape.radiomics_blocks else None
  )
  missing_sequence = np.full(patients, -1)
  lost = stress.random(patients) < shape.missing_sequence_rate
  missing_sequence[lost] = stress.integers(len(store.MRI_SEQUENCES), size=int(lost.sum()))
  outlier = stress.random(patients) < shape.outlier_rate
  scanner = stress.integers(shape.scanners_per_center, size=patients)

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
    scale = wsi_center_scale if row.center == 'B' and shape.center_scale_sd > 0 else None
    if row.has_wsi:
      xy, emb, is_key = _wsi_bag(prng, wsi, int(sizes[i]), row.wsi_view, center_b, shape, scale)
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
      nuisance = prng.standard_normal(shape.radiomics_blocks) if shape.radiomics_blocks else None
      for s, seq in enumerate(store.MRI_SEQUENCES):
        if missing_sequence[i] == s:
          continue
        for k in range(shape.mri_slices):
          e = (
            mri.tissue[s]
            + shape.mri_deep_noise * prng.standard_normal(store.MRI_DEEP_DIM)
            + shape.mri_deep_gain * row.mri_view * mri.signal
            + 0.25 * center_b * mri.shift
          )
          if scale is not None:
            e = e * deep_center_scale
          deep_pid.append(row.patient_id)
          deep_seq.append(seq)
          deep_slice.append(10 + k)
          deep_emb.append(np.maximum(e, 0.0).astype(np.float32))
        if realistic_radiomics is not None:
          values = realistic_radiomics.values(
            prng, row.mri_view, nuisance, int(row.center == 'B'), scanner[i], outlier[i], s
          )
        else:
          values = (
            radiomics_loadings * row.mri_view
            + prng.normal(0, 1, len(RADIOMICS_FEATURES))
            + 0.3 * center_b
          ) * radiomics_scale
        rad_rows.append(
          {
            'patient_id': row.patient_id,
            'sequence': seq,
            **dict(zip(radiomics_names, values.tolist())),
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
        'preset': preset,
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
        'mri_patients_missing_a_sequence': int((frame.has_mri.to_numpy() & lost).sum()),
        'radiomics_outlier_patients': int((frame.has_mri.to_numpy() & outlier).sum()),
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
