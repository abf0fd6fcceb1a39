"""Importing slide features made elsewhere (CLAM or TRIDENT `.h5` files) into a store.

Each manifest slide is matched by file stem to `<features_dir>/<stem>.h5` (or CLAM's
`h5_files/<stem>.h5`): a `features` (N, D) and a `coords` (N, 2, level-0 px) dataset.
The slide files are written exactly as extraction writes them (float16, same columns),
marked `provenance: imported` with the given encoder name; MRI is extracted as usual and
the store is assembled by the same code, so training cannot tell the two apart.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import logging

from feature_store import encoders, extract, store
from feature_store import manifest as manifest_lib

FORMATS = ('clam', 'trident')


class FeatureImportError(store.StoreError):
  """A features file is missing, malformed, or inconsistent with the others."""


@dataclasses.dataclass(frozen=True)
class ImportConfig:
  format: str = 'clam'
  features_dir: str = ''
  encoder_name: str = ''  # the encoder that made the features (uni, conch_v15, ...)
  patch_px: int | None = None  # used where the file does not record it
  mpp: float | None = None  # um/px of the patches, where the file does not record it
  extract: extract.ExtractConfig = extract.ExtractConfig()  # MRI settings, overwrite, prune


def _h5_path(features_dir: Path, stem: str) -> Path | None:
  for candidate in (features_dir / f'{stem}.h5', features_dir / 'h5_files' / f'{stem}.h5'):
    if candidate.is_file():
      return candidate
  return None


def _attr(attrs, *names):
  for n in names:
    if n in attrs:
      v = attrs[n]
      return v.item() if hasattr(v, 'item') else v
  return None


def read_h5(path: Path, cfg: ImportConfig) -> tuple[np.ndarray, np.ndarray, dict]:
  """(features float32 (N, D), coords int (N, 2), patch metadata) of one CLAM/TRIDENT file."""
  import h5py

  try:
    with h5py.File(path, 'r') as f:
      if 'features' not in f or 'coords' not in f:
        raise FeatureImportError(
          f'{path}: expected datasets features (N, D) and coords (N, 2), found {sorted(f)}'
        )
      feats = np.asarray(f['features'][()], np.float32)
      coords = np.asarray(f['coords'][()])
      attrs = {**dict(f.attrs), **dict(f['coords'].attrs), **dict(f['features'].attrs)}
  except OSError as e:
    raise FeatureImportError(f'{path}: not a readable HDF5 file ({e})') from e
  if feats.ndim == 3 and feats.shape[0] == 1:  # some pipelines save (1, N, D)
    feats = feats[0]
  if feats.ndim != 2 or coords.ndim != 2 or coords.shape != (len(feats), 2):
    raise FeatureImportError(
      f'{path}: features {feats.shape} and coords {coords.shape} do not match (N, D) / (N, 2)'
    )
  if not np.isfinite(feats).all() or not np.isfinite(feats.astype(np.float16)).all():
    raise FeatureImportError(f'{path}: features hold NaN or values beyond float16')
  patch_px = _attr(attrs, 'patch_size') or cfg.patch_px
  mpp = cfg.mpp or _attr(attrs, 'mpp', 'target_mpp')
  mag = _attr(attrs, 'target_magnification', 'magnification')
  if mpp is None and mag:
    mpp = 10.0 / float(mag)  # 20x ~ 0.5 um/px, the convention CLAM and TRIDENT use
  level = _attr(attrs, 'patch_level', 'level')
  size0 = _attr(attrs, 'patch_size_level0')
  return (
    feats,
    coords,
    {
      'patch_px': None if patch_px is None else int(patch_px),
      'mpp': None if mpp is None else float(mpp),
      'mpp_source': 'flag' if cfg.mpp else ('file' if mpp is not None else None),
      'patch_level': None if level is None else int(level),
      'patch_size_level0': None if size0 is None else int(size0),
      'magnification': None if mag is None else float(mag),
    },
  )


def import_features(
  manifest_path: Path | str, store_dir: Path | str, cfg: ImportConfig
) -> extract.Summary:
  """Writes a store from per-slide .h5 features plus MRI extracted as `launch.extract` does."""
  store_dir, features_dir = Path(store_dir), Path(cfg.features_dir)
  if cfg.format not in FORMATS:
    raise FeatureImportError(f'--format={cfg.format}: choose {" or ".join(FORMATS)}')
  if not features_dir.is_dir():
    raise FeatureImportError(f'--features_dir={features_dir}: no such folder')
  if not cfg.encoder_name:
    raise FeatureImportError('--encoder_name is required: the encoder that made the features')
  ecfg = cfg.extract
  man = manifest_lib.read_manifest(manifest_path, outcomes_required=ecfg.outcomes_required)
  for err in man.errors:
    logging.error('%s: %s', manifest_path, err)
  if not man.patients:
    raise manifest_lib.ManifestError(
      f'{manifest_path}: no valid patient row ({len(man.errors)} problems, each logged above); '
      'fix them and rerun: nothing was imported'
    )
  all_slides = [(p, s, _h5_path(features_dir, s.slide_id)) for p in man.patients for s in p.slides]
  found = [h for _, _, h in all_slides if h is not None]
  if not found:
    raise FeatureImportError(
      f'{features_dir}: no <slide stem>.h5 for any manifest slide (first expected: '
      f'{features_dir / (all_slides[0][1].slide_id + ".h5") if all_slides else "none"})'
    )
  feats0, _, meta0 = read_h5(found[0], cfg)
  dim = int(feats0.shape[1])
  encoder_fp = {
    'name': cfg.encoder_name,
    'dim': dim,
    'provenance': 'imported',
    'format': cfg.format,
  }
  wsi_fp = {
    'encoder': encoder_fp,
    'target_mpp': cfg.mpp if cfg.mpp is not None else meta0['mpp'],
    'patch_px': cfg.patch_px if cfg.patch_px is not None else meta0['patch_px'],
  }
  mri_encoder, mri_fp = extract.mri_encoder_and_fingerprint(ecfg)
  wsi_sha, mri_sha = extract.fingerprint_sha(wsi_fp), extract.fingerprint_sha(mri_fp)
  extract._check_existing(store_dir, wsi_sha, mri_sha, ecfg.overwrite)
  store_dir.mkdir(parents=True, exist_ok=True)

  summary = extract.Summary(patients=len(man.patients), rejected=len({e.line for e in man.errors}))
  summary.orphans = extract._handle_orphans(store_dir, man, ecfg.prune)
  summary.pruned = bool(summary.orphans) and ecfg.prune
  for patient, slide, h5 in all_slides:
    out = store.wsi_path(store_dir, slide.slide_id)
    if (extract._part_meta(out) or {}).get('fingerprint_sha256') == wsi_sha:
      summary.slides_skipped += 1
      continue
    if h5 is None:
      summary.failures.append(
        extract._failure(slide.slide_id, 'import', f'no {slide.slide_id}.h5 in {features_dir}')
      )
      continue
    try:
      feats, coords, meta = read_h5(h5, cfg)
      if feats.shape[1] != dim:
        raise FeatureImportError(f'{h5}: {feats.shape[1]}-d features, {found[0].name} has {dim}')
    except FeatureImportError as e:
      summary.failures.append(extract._failure(slide.slide_id, 'import', str(e)))
      continue
    store.write_slide(
      store_dir,
      slide.slide_id,
      patient.patient_id,
      coords.astype(np.int32),
      feats,
      {
        'slide_id': slide.slide_id,
        'patient_id': patient.patient_id,
        'source': h5.name,
        'source_sha256': encoders.sha256_file(h5),
        'provenance': 'imported',
        'format': cfg.format,
        **meta,
        'encoder': encoder_fp,
        'fingerprint_sha256': wsi_sha,
      },
    )
    summary.slides_done += 1
    summary.patches += len(feats)
  extract.run_mri(
    [p for p in man.patients if p.mri], store_dir, mri_encoder, ecfg, mri_sha, summary
  )
  ecfg1 = dataclasses.replace(ecfg, shard_index=0, shard_count=1)
  store.atomic_write_bytes(
    store_dir / extract.SHARDS_DIR / '0-of-1.json',
    json.dumps(
      {'wsi_sha256': wsi_sha, 'mri_sha256': mri_sha, 'failures': summary.failures}, indent=1
    ).encode(),
  )
  summary.finalised = extract._finalise(
    store_dir, man, ecfg1, wsi_fp, mri_fp, mri_encoder.pretrained, provenance='imported'
  )
  logging.info('%s', summary.counts('imported'))
  return summary
