"""Shared by the extraction tests that build a small cohort: a one-block ViT extraction
config and a manifest where only a few patients keep MRI (MRI is the slow part)."""

import csv
import dataclasses

from feature_store import extract, slides
from feature_store.synthetic_cohort import make_cohort

CONFIG = extract.ExtractConfig(
  encoder_weights='random',
  wsi_encoder='timm:vit_tiny_patch16_224',
  encoder_kwargs={'depth': 1},
  target_mpp=1.0,
  patch_px=64,
  batch_size=32,
  workers=1,
  mri_slices=1,
  tissue=slides.TissueParams(min_tissue_area=0.1, min_patch_tissue=0.1),
)


def config(**changes) -> extract.ExtractConfig:
  return dataclasses.replace(CONFIG, **changes)


def manifest_with_mri(out, *, patients: int, seed: int, keep: int = 1, mri_slices: int = 4):
  """A synthetic cohort's manifest with MRI for its first `keep` patients that have it."""
  manifest = make_cohort(
    out,
    patients=patients,
    seed=seed,
    slide_px=512,
    mri_px=32,
    mri_slices=mri_slices,
    progress=False,
  )
  with open(manifest, newline='') as f:
    rows = list(csv.DictReader(f))
  no_mri = dict(mri_t1='', mri_t2='', mri_t1c='', mri_mask='')
  kept = [i for i, r in enumerate(rows) if r['mri_mask']][:keep]
  rows = [r if i in kept else dict(r, **no_mri) for i, r in enumerate(rows)]
  with open(manifest, 'w', newline='') as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return manifest
