"""A synthetic NPC cohort as a hospital would export it: slides, MRI, manifest.

Slides are real pyramidal tiled TIFFs with JPEG tiles and resolution tags, so
OpenSlide opens them as generic-tiff at about 0.5 um/px. Their H&E-like texture
(nuclear density and size, stain hue) follows the patient's WSI view of the
latent. MRI volumes are NIfTI (T1, T2, contrast T1) at 0.5 x 0.5 x 3 mm with a
tumour mask whose volume, irregularity, intensity and texture follow the MRI
view. Center B, the external hospital, stains and scans differently.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import SimpleITK as sitk
import tifffile
from absl import logging
from tqdm import tqdm

from feature_store import store, synthetic

MANIFEST = 'manifest.csv'


@dataclasses.dataclass(frozen=True)
class CohortShape:
  """Image sizes; the defaults are small so a CPU can extract a cohort in minutes."""

  slide_px: int = 1536  # level-0 side of a slide
  slide_mpp: float = 0.5
  tile_px: int = 256
  min_levels: int = 3
  jpeg_quality: int = 90
  mri_px: int = 96  # in-plane matrix
  mri_slices: int = 12
  mri_spacing: tuple[float, float, float] = (0.5, 0.5, 3.0)  # x, y, z in mm


# ----------------------------------------------------------------------------- slides

_EOSIN = {'A': np.array([236, 160, 200], np.float32), 'B': np.array([220, 150, 215], np.float32)}
_HEMATOXYLIN = {'A': np.array([75, 45, 135], np.float32), 'B': np.array([95, 60, 160], np.float32)}


def render_slide(
  rng: np.random.Generator, view: float, center: str, side: int, nuclear_hue: float = 15.0
) -> np.ndarray:
  """An RGB uint8 H&E-like field: white glass, tissue islands, nuclei whose density and size
  rise with `view` and whose blue shifts by nuclear_hue * tanh(view)."""
  small = side // 8
  blobs = np.zeros((small, small), np.float32)
  for _ in range(rng.integers(2, 5)):
    c = rng.uniform(0.25, 0.75, 2) * small
    axes = rng.uniform(0.12, 0.3, 2) * small
    cv2.ellipse(
      blobs,
      (int(c[0]), int(c[1])),
      (int(axes[0]), int(axes[1])),
      float(rng.uniform(0, 180)),
      0,
      360,
      1.0,
      -1,
    )
  blobs += 0.35 * cv2.GaussianBlur(
    rng.random((small, small)).astype(np.float32), (0, 0), small / 16
  )
  tissue = cv2.resize(cv2.GaussianBlur(blobs, (0, 0), small / 40), (side, side)) > 0.6

  img = np.full((side, side, 3), 244, np.float32)
  eosin = _EOSIN[center] + rng.normal(0, 4, 3)
  texture = cv2.GaussianBlur(rng.normal(0, 1, (side, side)).astype(np.float32), (0, 0), 3)
  img[tissue] = eosin + 12 * texture[tissue, None]

  # Nuclei: density (per 100 um^2 at 0.5 um/px) and radius grow with the latent view.
  density = 0.9 * np.exp(0.45 * view)
  radius = 3.0 * np.exp(0.18 * view)
  n_nuclei = int(density * tissue.sum() / 400.0)
  ys, xs = np.nonzero(tissue)
  pick = rng.integers(len(xs), size=n_nuclei) if len(xs) else np.zeros(0, int)
  nuclei = np.zeros((side, side), np.float32)
  for x, y, r in zip(xs[pick], ys[pick], rng.gamma(6.0, radius / 6.0, n_nuclei)):
    cv2.ellipse(
      nuclei,
      (int(x), int(y)),
      (max(1, int(r)), max(1, int(r * rng.uniform(0.6, 1.0)))),
      float(rng.uniform(0, 180)),
      0,
      360,
      float(rng.uniform(0.7, 1.0)),
      -1,
    )
  nuclei = cv2.GaussianBlur(nuclei, (0, 0), 0.8)[..., None]
  hema = _HEMATOXYLIN[center] - nuclear_hue * np.tanh(view) * np.array([0, 0, -1], np.float32)
  img = img * (1 - nuclei) + hema * nuclei
  img += rng.normal(0, 3, img.shape).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8)


def write_pyramidal_tiff(
  path: Path,
  rgb: np.ndarray,
  *,
  mpp: float,
  tile: int = 256,
  min_levels: int = 3,
  quality: int = 90,
) -> None:
  """Tiled JPEG pyramid, one IFD per level, resolution in px/cm: OpenSlide's generic-tiff."""
  levels = [rgb]
  while len(levels) < min_levels or max(levels[-1].shape[:2]) > 2 * tile:
    h, w = levels[-1].shape[:2]
    if min(h, w) < 32:
      break
    levels.append(cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
  tmp = path.with_name(f'.{path.name}.tmp')
  with tifffile.TiffWriter(tmp) as tif:
    for i, level in enumerate(levels):
      level_mpp = mpp * rgb.shape[1] / level.shape[1]
      px_per_cm = 1e4 / level_mpp
      tif.write(
        level,
        tile=(tile, tile),
        photometric='rgb',
        compression='jpeg',
        compressionargs={'level': quality},
        resolution=(px_per_cm, px_per_cm),
        resolutionunit='CENTIMETER',
        subfiletype=1 if i else 0,
        description='MoEMIL-JAX synthetic H&E slide' if i == 0 else None,
      )
  tmp.replace(path)


# ----------------------------------------------------------------------------- MRI

_CONTRAST = {  # (background tissue, tumour) mean intensity per sequence
  't1': (420.0, 380.0),
  't2': (300.0, 520.0),
  't1c': (450.0, 700.0),
}


def render_mri(rng: np.random.Generator, view: float, center: str, shape: CohortShape):
  """Three co-registered volumes (z, y, x) and a tumour mask, all as numpy arrays."""
  nz, n = shape.mri_slices, shape.mri_px
  sx, sy, sz = shape.mri_spacing
  z, y, x = np.meshgrid(np.arange(nz) * sz, np.arange(n) * sy, np.arange(n) * sx, indexing='ij')
  head = ((x - n * sx / 2) / (0.45 * n * sx)) ** 2 + ((y - n * sy / 2) / (0.42 * n * sy)) ** 2 < 1

  # Tumour: an ellipsoid (volume grows with the view) whose radius is modulated by low-order
  # angular noise (irregularity grows with the view), kept inside the field of view.
  radius_mm = np.clip(7.0 * np.exp(0.22 * view) * rng.uniform(0.9, 1.1), 4.0, 0.3 * n * sx)
  centre = np.array(
    [nz * sz / 2, n * sy * rng.uniform(0.45, 0.55), n * sx * rng.uniform(0.45, 0.55)]
  )
  dz, dy, dx = z - centre[0], y - centre[1], x - centre[2]
  theta, phi = np.arctan2(dy, dx), np.arctan2(dz, np.hypot(dx, dy))
  irregular = 0.12 * np.exp(0.4 * view)
  wobble = sum(
    rng.normal(0, irregular / k) * np.cos(k * theta + rng.uniform(0, 6.3)) * np.cos((k - 1) * phi)
    for k in range(2, 6)
  )
  dist = np.sqrt((dx / 1.0) ** 2 + (dy / 0.85) ** 2 + (dz / 1.3) ** 2)
  mask = (dist < radius_mm * (1 + wobble)) & head
  if not mask.any():  # never ship an empty mask
    mask[nz // 2, n // 2, n // 2] = True

  def smooth(a, s):
    return np.stack([cv2.GaussianBlur(sl.astype(np.float32), (0, 0), s) for sl in a])

  mask_soft = smooth(mask, 1.0)
  texture = smooth(rng.normal(0, 1, mask.shape), 1.2)
  scanner_gain = 1.0 if center == 'A' else 1.35
  bias = 1.0 + (0.0 if center == 'A' else 0.15) * (x / x.max() - 0.5)
  volumes = {}
  for seq, (background, tumour) in _CONTRAST.items():
    tumour_mean = tumour * (1 + 0.08 * view)
    vol = np.where(head, background, 15.0) + (tumour_mean - background) * mask_soft * head
    vol = vol + (20 + 25 * np.exp(0.3 * view)) * texture * mask_soft + rng.normal(0, 12, vol.shape)
    volumes[seq] = np.clip(vol * scanner_gain * bias, 0, None).astype(np.int16)
  return volumes, mask.astype(np.uint8)


def _write_nifti(path: Path, array: np.ndarray, spacing) -> None:
  image = sitk.GetImageFromArray(array)
  image.SetSpacing(tuple(float(s) for s in spacing))
  tmp = path.with_name(f'.tmp_{path.name}')
  sitk.WriteImage(image, str(tmp), useCompression=True)
  tmp.replace(path)


# ----------------------------------------------------------------------------- cohort


def make_cohort(
  out_dir: str | Path,
  *,
  patients: int = 40,
  seed: int = 0,
  knobs: synthetic.Knobs = synthetic.Knobs(),
  shape: CohortShape = CohortShape(),
  progress: bool = True,
  **shape_overrides,
) -> Path:
  """Writes slides/, mri/, manifest.csv and truth.csv under out_dir; returns the manifest path."""
  shape = dataclasses.replace(shape, **shape_overrides)
  out = Path(out_dir)
  (out / 'slides').mkdir(parents=True, exist_ok=True)
  (out / 'mri').mkdir(parents=True, exist_ok=True)
  frame = synthetic.sample_patients(patients, seed, knobs)
  rows = []
  for row in tqdm(
    frame.itertuples(index=False), total=len(frame), desc='synthetic cohort', disable=not progress
  ):
    rng = np.random.default_rng(row.render_seed)
    slides = []
    if row.has_wsi:
      for s in range(row.n_slides):
        rel = Path('slides') / f'{row.patient_id}_s{s + 1}.tiff'
        rgb = render_slide(rng, row.wsi_view, row.center, shape.slide_px, knobs.nuclear_hue)
        write_pyramidal_tiff(
          out / rel,
          rgb,
          mpp=shape.slide_mpp,
          tile=shape.tile_px,
          min_levels=shape.min_levels,
          quality=shape.jpeg_quality,
        )
        slides.append(rel.as_posix())
    mri_paths = {f'mri_{s}': '' for s in ('t1', 't2', 't1c')} | {'mri_mask': ''}
    if row.has_mri:
      volumes, mask = render_mri(rng, row.mri_view, row.center, shape)
      for seq, vol in volumes.items():
        rel = Path('mri') / f'{row.patient_id}_{seq}.nii.gz'
        _write_nifti(out / rel, vol, shape.mri_spacing)
        mri_paths[f'mri_{seq}'] = rel.as_posix()
      rel = Path('mri') / f'{row.patient_id}_mask.nii.gz'
      _write_nifti(out / rel, mask, shape.mri_spacing)
      mri_paths['mri_mask'] = rel.as_posix()
    record = {c: getattr(row, c) for c in store.CLINICAL_COLUMNS}
    record['ic_response'] = '' if np.isnan(row.ic_response) else int(row.ic_response)
    rows.append(record | {'slides': ';'.join(slides)} | mri_paths)
  manifest = out / MANIFEST
  pd.DataFrame(rows).to_csv(manifest, index=False)
  synthetic.write_truth(frame, out / 'truth.csv')
  logging.info('synthetic cohort: %d patients written to %s', patients, out)
  return manifest
